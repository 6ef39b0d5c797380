"""GPTQ (Frantar et al. 2022, arXiv:2210.17323), Algorithm 1 with lazy batch updates,
activation ordering ("act-order") and static groups.

Pure function on tensors: ``gptq(W, H, scheme, cfg) -> QuantizedWeight``. ``H`` is the
layer-input second moment ``2/n * sum x x^T`` [in, in] collected by the calibration pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from llmpress.quant.primitives import (
    OBSERVERS,
    QuantizedWeight,
    QuantScheme,
    compute_qparams,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    """damp: fraction of mean(diag H) added to the diagonal; block_size: columns per lazy
    batch; act_order: process columns by decreasing diag(H); static_groups: compute each
    group's scale from the original weights up front (always on with act_order, so the saved
    groups stay contiguous and need no g_idx)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = False
    observer: str = "minmax"
    max_damp_retries: int = 6

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp={self.damp} must be in [0, 1)")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer={self.observer!r}; allowed: {list(OBSERVERS)}")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1")


def _inverse_cholesky(h: torch.Tensor, damp: float, retries: int, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 with dampening; retry with 10x more damping on failure."""
    mean_diag = torch.mean(torch.diag(h)).item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    d = damp
    for attempt in range(retries + 1):
        hd = h + (d * mean_diag + (1e-8 if d == 0 else 0.0)) * eye
        # U with U^T U = H^-1 from ONE factorisation: with J the order reversal and J H J = L L^T,
        # U = J L^-1 J (upper triangular, positive diagonal). Half the work of inverting H and
        # factorising the inverse (cholesky, cholesky_inverse, cholesky again).
        l, info = torch.linalg.cholesky_ex(hd.flip(0, 1))
        if info.item() == 0:
            u = torch.linalg.solve_triangular(l, eye, upper=False).flip(0, 1)
            if torch.isfinite(u).all() and bool((torch.diagonal(u) > 0).all()):
                if attempt:
                    log.warning("%s: Hessian not positive definite; succeeded with damp=%.3g", name, d)
                return u, d
        d = max(d, 1e-4) * 10
    raise torch.linalg.LinAlgError(f"{name}: Cholesky failed even with damp={d / 10:.3g}")


def _kernel_ok() -> bool:
    from llmpress import kernels

    return kernels.mode() != "reference" and kernels.triton_available()


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    scheme: QuantScheme,
    cfg: GPTQConfig = GPTQConfig(),
    name: str = "weight",
    mask: torch.Tensor | None = None,
    kernel: bool | None = None,
) -> QuantizedWeight:
    """Quantize ``w`` [N, K] minimising ``||(W - Q) X||^2`` given ``H = 2 X X^T / n`` [K, K].

    ``mask`` [N, K] (bool, True = kept) keeps a pruned weight's zeros: masked entries become
    the zero point (dequantizing to exactly 0) and their error is compensated like rounding
    error, so a sparse model stays sparse with the same mask.

    Falls back to round-to-nearest (with a warning) only if H stays singular after every
    dampening retry; never returns NaN or inf.

    ``kernel``: solve each lazy batch with the Triton kernel
    (:mod:`llmpress.kernels.triton_gptq`); default: on a CUDA device when the groups are static
    (act-order or static_groups) and ``LLMPRESS_KERNELS`` is not ``reference``.
    """
    if scheme.group_axis != 1:
        raise ValueError(f"{name}: GPTQ quantizes input columns in order; it needs group_axis 1, got {scheme.group_axis}")
    scheme.check_shape(w.shape, name)
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"{name}: Hessian shape {tuple(h.shape)} does not match in_features={k}")
    if not torch.isfinite(h).all():
        raise ValueError(f"{name}: calibration statistics contain NaN/inf (check the inputs)")
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    if mask is not None:
        if mask.shape != w.shape:
            raise ValueError(f"{name}: mask shape {tuple(mask.shape)} does not match weight {tuple(w.shape)}")
        mask = mask.to(device=W.device, dtype=torch.bool)
        W = W * mask

    dead = torch.diag(H) == 0  # inputs that never fire: any value is fine, pick 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    gs = scheme.group_size if scheme.strategy == "group" else k
    static = scheme.strategy != "group" or cfg.static_groups or cfg.act_order
    hdiag = torch.diag(H).clone()  # column importance for the mse observer
    if static:  # [N, G] from the original weights
        scale_all, zero_all = compute_qparams(W, scheme, cfg.observer, hdiag)

    perm = None
    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        mask = None if mask is None else mask[:, perm]
    col_group = (perm if perm is not None else torch.arange(k, device=W.device)) // gs

    try:
        U, used_damp = _inverse_cholesky(H, cfg.damp, cfg.max_damp_retries, name)
    except torch.linalg.LinAlgError as e:
        log.warning("%s: %s; falling back to round-to-nearest", name, e)
        from llmpress.quant.rtn import rtn

        out = rtn(w, scheme)
        out.info.update(fallback="rtn")
        return out
    del H

    Q = torch.zeros(n, k, dtype=scheme.qdtype, device=W.device)
    if not static:
        scale_all = torch.empty(n, k // gs, dtype=torch.float32, device=W.device)
        zero_all = None if scheme.symmetric else torch.empty(n, k // gs, dtype=torch.int8, device=W.device)
    if scheme.strategy == "tensor":
        scale_all = scale_all.reshape(1, 1).expand(n, 1)
        zero_all = None if zero_all is None else zero_all.reshape(1, 1).expand(n, 1)
    loss = torch.zeros((), device=W.device)
    kernel_fits = static and scheme.type == "int" and cfg.block_size <= 128
    if kernel is None:
        kernel = kernel_fits and W.is_cuda and _kernel_ok()
    elif kernel and not kernel_fits:
        raise ValueError(f"{name}: the GPTQ kernel takes static integer groups and block_size <= 128")

    B = cfg.block_size
    for i1 in range(0, k, B):
        i2 = min(i1 + B, k)
        W1 = W[:, i1:i2].clone()  # [N, b]
        U1 = U[i1:i2, i1:i2]
        if static:  # each column's scale / zero point, gathered once per batch: [N, b]
            cg = col_group[i1:i2] if scheme.strategy == "group" else torch.zeros(i2 - i1, dtype=torch.long,
                                                                                   device=W.device)
            S1 = scale_all[:, cg].float()
            Z1 = None if zero_all is None else zero_all[:, cg].float()
        M1 = None if mask is None else mask[:, i1:i2]
        if kernel:
            from llmpress.kernels.triton_gptq import gptq_block

            Q1, E1 = gptq_block(W1, U1, S1, Z1, None if M1 is None else M1.to(torch.uint8),
                                scheme.qmin, scheme.qmax)
            Q[:, i1:i2] = Q1.to(Q.dtype)
        else:
            E1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                col = i1 + i
                if not static and col % gs == 0:  # lazy group params from the updated weights
                    cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]  # [N, gs]
                    s, z = compute_qparams(cur, QuantScheme(scheme.bits, scheme.symmetric, "channel",
                                                            type=scheme.type), cfg.observer, hdiag[col : col + gs])
                    scale_all[:, col // gs] = s[:, 0]
                    if z is not None:
                        zero_all[:, col // gs] = z[:, 0]
                if static:
                    s = S1[:, i]
                    z = Z1[:, i] if Z1 is not None else 0.0
                else:
                    s = scale_all[:, col // gs]
                    z = zero_all[:, col // gs].float() if zero_all is not None else 0.0
                x = W1[:, i]
                q = scheme.round(x / s + z)
                if M1 is not None:
                    q = torch.where(M1[:, i], q, z if zero_all is not None else torch.zeros_like(q))
                dq = (q - z) * s
                Q[:, col] = q.to(Q.dtype)
                err = (x - dq) / U1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)  # [N,1] x [1,b-i]
                E1[:, i] = err
        loss += (E1 * E1).sum() / 2  # sum (x - dq)^2 / d^2 / 2
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update of the remaining columns

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    scale = scale_all[:1].reshape(1) if scheme.strategy == "tensor" else scale_all
    zero = None
    if zero_all is not None:
        zero = zero_all[:1].reshape(1) if scheme.strategy == "tensor" else zero_all
    out = QuantizedWeight(Q, scale.contiguous().to(w.dtype), None if zero is None else zero.contiguous(), scheme)
    if not torch.isfinite(out.scale).all():
        raise FloatingPointError(f"{name}: GPTQ produced non-finite scales")
    out.info.update(gptq_loss=float(loss), damp=used_damp)
    return out
