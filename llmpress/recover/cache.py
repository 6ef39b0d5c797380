"""Teacher logits cached to disk, so distillation does not need the teacher in memory (or on the
same machine) while the student trains.

Full logits are too big to keep (a 49k vocabulary x 256 tokens x 4 bytes = 50 MB per sequence),
so the cache keeps, per token, the teacher's ``k`` largest logits, their vocabulary indices and
the log-sum-exp of all logits at the distillation temperature. The distillation loss is then the
KL divergence between the teacher and the student on k + 1 outcomes: the k teacher-top tokens
and "any other token" (:func:`kd_loss_topk`). With k = vocabulary size it equals the full KL; with
a smaller k it is a lower bound of it (merging outcomes never increases a KL divergence), and
in practice nearly all of the teacher's mass sits in the top 64.

Chunks of rows are written as safetensors files plus ``cache.json`` (shape, k, temperature and a
hash of the token ids, so a cache cannot be used with other training data by mistake); the
directory is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

log = logging.getLogger(__name__)
FORMAT = "llmpress-teacher-topk/1"


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:32]


def kd_loss_topk(student: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, lse: torch.Tensor, t: float = 1.0,
                 mode: str = "forward", mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """KL between teacher and student over the teacher's top-k tokens plus one "rest" outcome,
    temperature ``t`` (times t², as :func:`~llmpress.recover.train.kd_loss`). ``vals``/``idx``
    [..., k]: the teacher's top logits and their token ids; ``lse`` [...]: log-sum-exp of the
    teacher's logits / t."""
    ls = F.log_softmax(student.float() / t, -1)
    ls_k = ls.gather(-1, idx.long())
    lq_k = vals.float() / t - lse.float().unsqueeze(-1)
    # log of the remaining mass: log(1 - sum exp(l_k)), kept finite when the top-k holds it all
    ls_r = torch.log1p(-ls_k.exp().sum(-1).clamp(max=1 - 1e-7))
    lq_r = torch.log1p(-lq_k.exp().sum(-1).clamp(max=1 - 1e-7))
    if mode == "forward":
        kl = (lq_k.exp() * (lq_k - ls_k)).sum(-1) + lq_r.exp() * (lq_r - ls_r)
    elif mode == "reverse":
        kl = (ls_k.exp() * (ls_k - lq_k)).sum(-1) + ls_r.exp() * (ls_r - lq_r)
    else:
        raise ValueError(f"mode={mode!r}")
    return _reduce(kl, mask, reduction) * t * t


def _reduce(v: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if mask is not None:
        v = v * mask
    if reduction == "sum":
        return v.sum()
    return v.sum() / (mask.sum().clamp(min=1) if mask is not None else v.numel())


class TeacherCache:
    """A directory written by :func:`cache_teacher`; ``get(rows)`` returns the top-k logits,
    their token ids and the log-sum-exp for those training rows."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_f = self.path / "cache.json"
        if not meta_f.is_file():
            raise FileNotFoundError(f"{self.path} is not a teacher cache (no cache.json)")
        self.meta = json.loads(meta_f.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_f}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.rows_per_chunk = int(self.meta["rows_per_chunk"])
        self._files: dict[int, object] = {}

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    def check(self, tokens: torch.Tensor, temperature: float) -> None:
        """Refuse a cache built on other tokens or at another temperature."""
        if list(tokens.shape) != self.meta["shape"] or tokens_digest(tokens) != self.meta["tokens_sha256"]:
            raise ValueError(f"teacher cache {self.path} was built on other training tokens "
                             f"(shape {self.meta['shape']}); rebuild it for this data")
        if abs(float(self.meta["temperature"]) - temperature) > 1e-9:
            raise ValueError(f"teacher cache {self.path} was built at temperature {self.meta['temperature']}, "
                             f"the run uses {temperature}")

    def _chunk(self, c: int):
        if c not in self._files:
            self._files[c] = safe_open(str(self.path / f"chunk-{c:05d}.safetensors"), "pt")
        return self._files[c]

    def get(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vals, idx, lse = [], [], []
        for r in rows.tolist():
            c, o = divmod(int(r), self.rows_per_chunk)
            f = self._chunk(c)
            vals.append(f.get_slice("values")[o:o + 1])
            idx.append(f.get_slice("indices")[o:o + 1])
            lse.append(f.get_slice("lse")[o:o + 1])
        return torch.cat(vals), torch.cat(idx), torch.cat(lse)


@torch.no_grad()
def cache_teacher(teacher: nn.Module, tokens: torch.Tensor, out: str | os.PathLike, k: int = 64,
                  temperature: float = 1.0, batch_size: int = 4, rows_per_chunk: int = 64,
                  overwrite: bool = False, progress: bool = True) -> TeacherCache:
    """Run ``teacher`` over ``tokens`` [n, seqlen] once and write its top-``k`` logits (float32),
    token ids (int32) and log-sum-exp at ``temperature`` (float32), ``rows_per_chunk`` rows per
    file."""
    from llmpress.formats.compressed_tensors import atomic_dir

    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [n, seqlen]; got {tuple(tokens.shape)}")
    if k < 1 or temperature <= 0 or rows_per_chunk < 1:
        raise ValueError(f"k={k}, temperature={temperature}, rows_per_chunk={rows_per_chunk} must be positive")
    dev = next(teacher.parameters()).device
    teacher.eval()
    n = tokens.shape[0]
    kk = k
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="teacher logits", unit="seq")
    with atomic_dir(out, overwrite) as tmp:
        for c0 in range(0, n, rows_per_chunk):
            parts: dict[str, list[torch.Tensor]] = {"values": [], "indices": [], "lse": []}
            for b0 in range(c0, min(c0 + rows_per_chunk, n), batch_size):
                ids = tokens[b0:min(b0 + batch_size, c0 + rows_per_chunk, n)].to(dev)
                logits = teacher(input_ids=ids, use_cache=False).logits.float()
                kk = min(k, logits.shape[-1])
                v, i = logits.topk(kk, dim=-1)
                parts["values"].append(v.cpu())
                parts["indices"].append(i.to(torch.int32).cpu())
                parts["lse"].append(torch.logsumexp(logits / temperature, -1).cpu())
                del logits
                if bar is not None:
                    bar.update(ids.shape[0])
            save_file({key: torch.cat(v).contiguous() for key, v in parts.items()},
                      str(tmp / f"chunk-{c0 // rows_per_chunk:05d}.safetensors"))
        (tmp / "cache.json").write_text(json.dumps({
            "format": FORMAT, "shape": list(tokens.shape), "k": kk,
            "temperature": temperature, "rows_per_chunk": rows_per_chunk,
            "tokens_sha256": tokens_digest(tokens),
        }, indent=1))
    if bar is not None:
        bar.close()
    log.info("cached the teacher's top-%d logits for %d sequences in %s", k, n, out)
    return TeacherCache(out)
