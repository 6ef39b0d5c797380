"""SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774): one-shot pruning as sparse
regression. Columns are processed left to right; the mask is chosen per block of columns
(adaptive mask selection, score ``w^2 / [H^-1]_jj^2``) or per N:M group, and each pruned (and,
with ``scheme``, quantized) column's error is spread over the columns not yet processed
through the inverse Hessian, as in GPTQ. Pure function on tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from llmpress.prune.masks import SparseWeight, SparsityPattern
from llmpress.quant.gptq import _inverse_cholesky
from llmpress.quant.primitives import QuantizedWeight, QuantScheme, compute_qparams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparseGPTConfig:
    """damp: fraction of mean(diag H) added to the diagonal; block_size: columns per lazy batch
    and per adaptive mask selection."""

    damp: float = 0.01
    block_size: int = 128
    max_damp_retries: int = 6

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp={self.damp} must be in [0, 1)")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1")


def sparsegpt(
    w: torch.Tensor,
    h: torch.Tensor,
    pat: SparsityPattern,
    cfg: SparseGPTConfig = SparseGPTConfig(),
    scheme: QuantScheme | None = None,
    name: str = "weight",
) -> SparseWeight | QuantizedWeight:
    """Prune ``w`` [N, K] to ``pat`` minimising ``||(W - W') X||^2`` given ``H = 2 X X^T / n``.

    With ``scheme`` (integer, groups along the input) the kept weights are quantized in the
    same sweep (SparseGPT's joint sparse + quantized solve) and a :class:`QuantizedWeight`
    whose pruned entries dequantize to exactly 0 is returned.
    """
    n, k = w.shape
    pat.check_shape(w.shape, name)
    if h.shape != (k, k):
        raise ValueError(f"{name}: Hessian shape {tuple(h.shape)} does not match in_features={k}")
    if not torch.isfinite(h).all():
        raise ValueError(f"{name}: calibration statistics contain NaN/inf (check the inputs)")
    if scheme is not None:
        if scheme.type != "int" or scheme.group_axis != 1 or scheme.strategy == "tensor":
            raise ValueError(f"{name}: joint SparseGPT quantization needs integer weights with per-channel "
                             "or input-dimension groups")
        scheme.check_shape(w.shape, name)
    if pat.m and cfg.block_size % pat.m:
        raise ValueError(f"block_size={cfg.block_size} must be a multiple of M={pat.m}")
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, used_damp = _inverse_cholesky(H, cfg.damp, cfg.max_damp_retries, name)
    del H

    gs = (scheme.group_size if scheme.strategy == "group" else k) if scheme is not None else k
    if scheme is not None:
        Q = torch.zeros(n, k, dtype=scheme.qdtype, device=W.device)
        scale_all = torch.empty(n, k // gs, dtype=torch.float32, device=W.device)
        zero_all = None if scheme.symmetric else torch.empty(n, k // gs, dtype=torch.int8, device=W.device)
        chan = QuantScheme(scheme.bits, scheme.symmetric, "channel")
    prune = torch.zeros(n, k, dtype=torch.bool, device=W.device)  # True = pruned
    loss = torch.zeros((), device=W.device)
    B = cfg.block_size
    for i1 in range(0, k, B):
        i2 = min(i1 + B, k)
        W1 = W[:, i1:i2].clone()  # [N, b]
        U1 = U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        d1 = torch.diag(U1)  # [b]
        P1 = torch.zeros(n, i2 - i1, dtype=torch.bool, device=W.device)  # True = pruned
        if not pat.m and pat.sparsity > 0:  # adaptive mask for this block
            score = W1.pow(2) / d1.pow(2).unsqueeze(0)  # [N, b]
            n_prune = int(score.numel() * pat.sparsity)
            if n_prune:
                P1.view(-1)[torch.sort(score.flatten(), stable=True).indices[:n_prune]] = True
        for i in range(i2 - i1):
            col = i1 + i
            if pat.m and i % pat.m == 0:  # choose this N:M group's mask from the updated weights
                score = W1[:, i : i + pat.m].pow(2) / d1[i : i + pat.m].pow(2).unsqueeze(0)  # [N, M]
                P1[:, i : i + pat.m].scatter_(1, score.topk(pat.m - pat.n, dim=1, largest=False).indices, True)
            x = W1[:, i]
            keep = ~P1[:, i]
            if scheme is not None:
                if col % gs == 0:  # group parameters from the kept, updated weights
                    cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]  # [N, gs]
                    if not pat.m:
                        cur = cur * torch.cat([~P1[:, i:], torch.ones_like(W[:, i2:], dtype=torch.bool)], 1)[:, :gs]
                    s, z = compute_qparams(cur, chan)
                    scale_all[:, col // gs] = s[:, 0]
                    if z is not None:
                        zero_all[:, col // gs] = z[:, 0]
                s = scale_all[:, col // gs]
                z = zero_all[:, col // gs].float() if zero_all is not None else torch.zeros_like(s)
                q = torch.where(keep, scheme.round(x / s + z), z)
                Q[:, col] = q.to(Q.dtype)
                dq = (q - z) * s
            else:
                dq = x * keep
            d = U1[i, i]
            err = (x - dq) / d
            loss += ((x - dq) ** 2).sum() / d**2 / 2
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)  # [N,1] x [1,b-i]
            W1[:, i] = dq
            E1[:, i] = err
        W[:, i1:i2] = W1
        prune[:, i1:i2] = P1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update of the remaining columns

    keep = ~prune
    info = dict(sparsegpt_loss=float(loss), damp=used_damp, sparsity=float(prune.float().mean()))
    if scheme is None:
        return SparseWeight(W * keep, keep, info)
    zero = None if zero_all is None else zero_all.contiguous()
    out = QuantizedWeight(Q, scale_all.contiguous().to(w.dtype), zero, scheme, info)
    if not torch.isfinite(out.scale).all():
        raise FloatingPointError(f"{name}: SparseGPT produced non-finite scales")
    return out
