"""Sparsity patterns, mask selection, and the score-based pruners.

- magnitude: ``|W|``, one threshold per layer (Han et al. 2015).
- Wanda (Sun et al. 2023, arXiv:2306.11695): ``|W_ij| * ||X_j||_2``, compared within each
  output row, no weight update.

Masks are boolean, ``True`` = keep. ``N:M`` keeps exactly N of every M consecutive input
weights of each row (NVIDIA's 2:4 semi-structured sparsity).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SparsityPattern:
    """``sparsity`` is the pruned fraction for ``unstructured``; ``n:m`` keeps n of every m."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, pattern: str, sparsity: float) -> SparsityPattern:
        if pattern in ("unstructured", None):
            return cls(float(sparsity))
        mt = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
        if not mt:
            raise ValueError(f"pattern={pattern!r} is not allowed; allowed: 'unstructured' or 'N:M' such as '2:4'")
        n, m = int(mt[1]), int(mt[2])
        if not 0 < n < m:
            raise ValueError(f"pattern {pattern!r}: need 0 < N < M (N weights kept of every M), got N={n}, M={m}")
        return cls(1 - n / m, n, m)

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity!r} is not allowed; allowed: a fraction in [0, 1) (0.5 = half pruned)")

    @property
    def structured(self) -> bool:
        return self.m > 0

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{self.sparsity:.0%}"

    def check_shape(self, shape: tuple[int, int] | torch.Size, name: str = "weight") -> None:
        if self.m and shape[1] % self.m:
            raise ValueError(f"{name}: in_features={shape[1]} is not a multiple of M={self.m} for the "
                             f"{self.n}:{self.m} pattern; ignore this layer or use 'unstructured'")


@dataclass
class SparseWeight:
    """A pruned weight: the dense values with zeros where ``mask`` is False."""

    weight: torch.Tensor  # [out, in]
    mask: torch.Tensor  # [out, in] bool, True = kept
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def describe(self) -> str:
        return f"sparse {1 - self.mask.float().mean().item():.0%}"


def select(score: torch.Tensor, pat: SparsityPattern, per_row: bool) -> torch.Tensor:
    """Keep-mask with the largest scores: N of every M per row, or (1 - sparsity) of each row
    (``per_row``) or of the whole matrix. Exact counts; ties broken by position."""
    rows, k = score.shape
    if pat.m:
        s = score.reshape(rows, k // pat.m, pat.m)  # [R, K, M] -> groups of M
        keep = torch.zeros_like(s, dtype=torch.bool)
        keep.scatter_(2, s.topk(pat.n, dim=2).indices, True)
        return keep.reshape(rows, k)
    keep = torch.ones_like(score, dtype=torch.bool)
    if per_row:
        n_prune = int(k * pat.sparsity)
        if n_prune:
            idx = torch.sort(score, dim=1, stable=True).indices[:, :n_prune]
            keep.scatter_(1, idx, False)
        return keep
    n_prune = int(score.numel() * pat.sparsity)
    if n_prune:
        idx = torch.sort(score.flatten(), stable=True).indices[:n_prune]
        keep.view(-1)[idx] = False
    return keep


def magnitude(w: torch.Tensor, pat: SparsityPattern) -> SparseWeight:
    """Prune the smallest ``|W|`` of the layer (or of each N:M group)."""
    pat.check_shape(w.shape)
    keep = select(w.detach().float().abs(), pat, per_row=False)
    return SparseWeight(w.detach().float() * keep, keep)


def wanda(w: torch.Tensor, sqnorm: torch.Tensor, pat: SparsityPattern) -> SparseWeight:
    """Wanda: prune the smallest ``|W_ij| * ||X_j||`` within each output row. ``sqnorm`` [in]
    is the mean of ``x_j^2`` over the calibration tokens (the scale does not matter)."""
    pat.check_shape(w.shape)
    if sqnorm.shape != (w.shape[1],):
        raise ValueError(f"activation norms have shape {tuple(sqnorm.shape)}, expected ({w.shape[1]},)")
    score = w.detach().float().abs() * sqnorm.float().clamp(min=0).sqrt().to(w.device).unsqueeze(0)
    keep = select(score, pat, per_row=True)
    return SparseWeight(w.detach().float() * keep, keep)
