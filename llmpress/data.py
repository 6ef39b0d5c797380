"""Text corpora, calibration sampling and evaluation windows (DESIGN.md section 4)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llmpress import assets

log = logging.getLogger(__name__)


def text(source: str, split: str = "eval") -> str:
    """A named corpus split (``wiki``) or the contents of a UTF-8 text file."""
    if source in assets.CORPORA:
        return assets.corpus_text(source, split)
    p = Path(source)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    raise FileNotFoundError(
        f"corpus {source!r} is neither a named corpus ({sorted(assets.CORPORA)}) nor a text file"
    )


def tokenize(tokenizer, txt: str) -> torch.Tensor:
    """The whole text as one id sequence, no special tokens added. Returns int64 [T]."""
    old = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = int(1e12)  # silence the "sequence too long" warning
        ids = tokenizer(txt, add_special_tokens=False)["input_ids"]
    finally:
        if old is not None:
            tokenizer.model_max_length = old
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Calibration:
    """Consecutive ``seqlen``-token chunks of a corpus, ``n_samples`` of them drawn with
    ``torch.randperm(n, generator=manual_seed(seed))``."""

    source: str = "wiki"
    n_samples: int = 64
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.seqlen < 2:
            raise ValueError(f"n_samples={self.n_samples} and seqlen={self.seqlen} must be >= 1 and >= 2")

    def tokens(self, tokenizer) -> torch.Tensor:
        """int64 [n_samples, seqlen]"""
        ids = tokenize(tokenizer, text(self.source, "calib"))
        n = ids.numel() // self.seqlen
        if n < self.n_samples:
            raise ValueError(
                f"calibration corpus {self.source!r} has {n} chunks of {self.seqlen} tokens; "
                f"asked for {self.n_samples}"
            )
        chunks = ids[: n * self.seqlen].reshape(n, self.seqlen)  # [T] -> [n, seqlen]
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: self.n_samples]
        return chunks[idx]


def calibration(source: str = "wiki", n_samples: int = 64, seqlen: int = 512, seed: int = 0) -> Calibration:
    return Calibration(source, n_samples, seqlen, seed)


def eval_windows(tokenizer, source: str = "wiki", seqlen: int = 1024, n_windows: int = 24) -> torch.Tensor:
    """The first ``n_windows * seqlen`` tokens of the evaluation text, int64 [N, L]."""
    ids = tokenize(tokenizer, text(source, "eval"))
    have = ids.numel() // seqlen
    if have < n_windows:
        raise ValueError(f"eval text {source!r} has only {have} windows of {seqlen} tokens; asked for {n_windows}")
    return ids[: n_windows * seqlen].reshape(n_windows, seqlen)  # [T] -> [N, L]
