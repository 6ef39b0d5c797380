"""Truncated SVD and activation-aware SVD of a weight, ``W [out, in] ~ A [out, r] @ B [r, in]``.

- ``svd``: the best rank-r approximation in the Frobenius norm of W itself.
- ``asvd``: the best rank-r approximation of the layer's *output* on the calibration inputs,
  ``min ||(W - AB) X^T||``, by whitening with the Cholesky factor of ``H = X^T X`` (``H = L L^T``):
  SVD of ``W L`` truncated to r, then ``B = V_r^T L^-1`` (SVD-LLM, Wang et al. 2024,
  arXiv:2403.07378; ASVD, Yuan et al. 2023, arXiv:2312.05821 scales by activations likewise).

A layer keeps ``ratio`` of its parameters with rank ``floor(ratio * out * in / (out + in))``.
Pure functions on tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class LowRankWeight:
    a: torch.Tensor  # [out, r]
    b: torch.Tensor  # [r, in]
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.a.shape[0], self.b.shape[1]))

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.a.float() @ self.b.float()).to(dtype)

    def describe(self) -> str:
        return f"rank {self.rank}"

    def storage_bits(self) -> int:
        return (self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()) * 8

    def to(self, device: torch.device | str) -> LowRankWeight:
        return LowRankWeight(self.a.to(device), self.b.to(device), self.info)


def rank_for(shape: tuple[int, int] | torch.Size, ratio: float) -> int:
    """Largest rank whose two factors hold at most ``ratio`` of the dense parameters (>= 1)."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio={ratio!r} must be in (0, 1): the fraction of the layer's parameters kept")
    n, k = int(shape[0]), int(shape[1])
    return max(1, int(ratio * n * k / (n + k)))


def svd(w: torch.Tensor, rank: int) -> LowRankWeight:
    """Truncated SVD; the singular values are split evenly between the factors."""
    W = w.detach().float()
    _check(W, rank)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    s = S[:rank].sqrt()
    kept = float(S[:rank].pow(2).sum() / S.pow(2).sum().clamp(min=1e-30))
    return LowRankWeight(U[:, :rank] * s, s.unsqueeze(1) * Vh[:rank], {"rank": rank, "energy_kept": kept})


def asvd(w: torch.Tensor, h: torch.Tensor, rank: int, damp: float = 0.01, name: str = "weight") -> LowRankWeight:
    """Activation-aware truncated SVD minimising the output error on inputs with second moment
    ``h`` [in, in]. Dampening (``damp`` x mean diagonal, raised on failure) keeps the whitening
    invertible when some inputs never fire."""
    W = w.detach().float()
    _check(W, rank)
    k = W.shape[1]
    if h.shape != (k, k):
        raise ValueError(f"{name}: Hessian shape {tuple(h.shape)} does not match in_features={k}")
    if not torch.isfinite(h).all():
        raise ValueError(f"{name}: calibration statistics contain NaN/inf (check the inputs)")
    H = h.detach().float()
    mean = float(H.diagonal().mean().clamp(min=1e-12))
    eye = torch.eye(k, dtype=H.dtype, device=H.device)
    d = damp
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + d * mean * eye)
        if info.item() == 0:
            break
        d = max(d, 1e-4) * 10
    else:
        log.warning("%s: input statistics are singular even with damping; using plain SVD", name)
        out = svd(W, rank)
        out.info["fallback"] = "svd"
        return out
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    s = S[:rank].sqrt()
    # B = s * V_r^T L^-1, i.e. solve B L = s V_r^T  <=>  L^T B^T = (s V_r^T)^T
    Bt = torch.linalg.solve_triangular(L.T, (s.unsqueeze(1) * Vh[:rank]).T, upper=True)
    kept = float(S[:rank].pow(2).sum() / S.pow(2).sum().clamp(min=1e-30))
    return LowRankWeight(U[:, :rank] * s, Bt.T.contiguous(), {"rank": rank, "energy_kept": kept, "damp": d})


def _check(W: torch.Tensor, rank: int) -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank={rank} must be in 1..{min(W.shape)} for a {tuple(W.shape)} weight")
