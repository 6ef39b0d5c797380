"""Training data for recovery: plain text, or JSONL in the common instruction formats
(alpaca-style instruction / input / output, and chat ``messages`` rendered with the model's chat
template), packed into fixed-length sequences with a loss mask that leaves prompt tokens out.

Malformed JSONL lines (bad JSON, missing fields) are reported with file and line number and
skipped (``on_error="skip"``, logged) or rejected (``on_error="raise"``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
FORMATS = ("auto", "alpaca", "chat")

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Example:
    ids: list[int]
    train: list[bool]  # per token: is predicting this token part of the loss


class DataError(ValueError):
    pass


def _alpaca(rec: dict, tok) -> Example:
    if not isinstance(rec.get("instruction"), str) or not isinstance(rec.get("output"), str):
        raise DataError("alpaca records need string 'instruction' and 'output' fields")
    inp = rec.get("input") or ""
    prompt = (ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT).format(instruction=rec["instruction"], input=inp)
    p = tok(prompt, add_special_tokens=False).input_ids
    c = tok(rec["output"], add_special_tokens=False).input_ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    return Example(p + c, [False] * len(p) + [True] * len(c))


def _chat(rec: dict, tok) -> Example:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        raise DataError("chat records need 'messages': a list of {role, content}")
    if not getattr(tok, "chat_template", None):
        raise DataError("the tokenizer has no chat template; render the conversations to text, or use alpaca / plain text")

    def render(ms, gen=False) -> list[int]:
        out = tok.apply_chat_template(ms, tokenize=True, add_generation_prompt=gen)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def common(a: list[int], b: list[int]) -> int:  # tokens merge across the boundary: compare, not count
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    ids = render(msgs)
    train = [False] * len(ids)
    for i, m in enumerate(msgs):  # loss on each assistant turn: tokens between its prompt and its end
        if m["role"] != "assistant":
            continue
        start = common(render(msgs[:i], gen=True), ids)
        end = common(render(msgs[: i + 1]), ids)
        for j in range(start, min(end, len(ids))):
            train[j] = True
    if not any(train):
        raise DataError("a conversation without an assistant turn trains nothing")
    return Example(ids, train)


def read_jsonl(path: str | os.PathLike, tok, fmt: str = "auto", on_error: str = "skip") -> list[Example]:
    """Examples from a JSONL file; ``fmt`` alpaca | chat | auto (per line: 'messages' → chat)."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; allowed: {FORMATS}")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r}; allowed: skip, raise")
    path = Path(path)
    out, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise DataError("a line must hold a JSON object")
                kind = fmt if fmt != "auto" else ("chat" if "messages" in rec else "alpaca")
                out.append(_chat(rec, tok) if kind == "chat" else _alpaca(rec, tok))
            except (json.JSONDecodeError, DataError) as e:
                msg = f"{path}:{ln}: {e}"
                if on_error == "raise" or "chat template" in str(e):
                    raise DataError(msg) from e
                bad += 1
                log.warning("skipping %s", msg)
    if bad:
        log.warning("%s: skipped %d malformed line(s), kept %d", path, bad, len(out))
    if not out:
        raise DataError(f"{path}: no usable examples")
    return out


def read_text(path: str | os.PathLike, tok) -> list[Example]:
    ids = tok(Path(path).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    return [Example(ids, [True] * len(ids))]


def pack(examples: list[Example], seqlen: int, eos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate examples into [n, seqlen] token rows and a bool mask of the same shape; mask
    [r, t] says whether predicting token t (from t-1) counts in the loss. The tail that does not
    fill a row is dropped."""
    ids: list[int] = []
    train: list[bool] = []
    for ex in examples:
        ids += ex.ids
        train += ex.train
    n = len(ids) // seqlen
    if n < 1:
        raise DataError(f"{len(ids)} tokens do not fill one sequence of {seqlen}")
    t = torch.tensor(ids[: n * seqlen], dtype=torch.long).reshape(n, seqlen)
    m = torch.tensor(train[: n * seqlen], dtype=torch.bool).reshape(n, seqlen)
    return t, m
