"""HQQ: half-quadratic quantization (Badri & Shaji 2023, "Half-Quadratic Quantization of Large
Machine Learning Models"), calibration-free.

Minimises ``||W - (Q - z) s||_p^p`` with ``p < 1`` (a sparsity-promoting norm that ignores the
few weights rounding cannot fit) by half-quadratic splitting: an auxiliary error ``W_e`` is
updated by the generalised soft-threshold of the ``l_p`` norm, then the zero point by its
closed form, with the penalty ``beta`` growing by ``kappa`` each step. The scale stays the
min-max one, as in the reference solver, which also stops at the first step that does not
lower the weight's mean absolute error (kept here, with the best zero rather than the next one).
Groups run along the input dimension or, with ``group_axis`` 0, along the output dimension
(the reference's ``axis=0``). Pure function on tensors, vectorised over groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.quant.primitives import QuantizedWeight, QuantScheme, _grouped, _ungrouped


@dataclass(frozen=True)
class HQQConfig:
    """lp_norm, beta, kappa, iters: the reference solver's defaults. ``int_zero``: round the
    optimised zero point to an integer (compressed-tensors and vLLM store integer zero points)
    and refit the scale for it; False keeps a float zero point (llmpress checkpoints only)."""

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    int_zero: bool = True
    shrink: tuple[float, ...] = (1.0,)  # range shrink factors (1.0: min-max): each group starts from the one
    # whose plain rounding has the lowest l_p error, then the zero point is optimised once
    early_stop: bool = True  # stop at the first step that does not lower the tensor's mean |error| (the
    # reference's default), keeping the zero point that step computed, as the reference does; False
    # runs every step and keeps each group's best

    def __post_init__(self) -> None:
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"lp_norm={self.lp_norm} must be in (0, 1]")
        if self.beta <= 0 or self.kappa < 1 or self.iters < 1:
            raise ValueError(f"need beta > 0, kappa >= 1, iters >= 1; got {self.beta}, {self.kappa}, {self.iters}")


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of ``|x|_p^p / beta`` (generalised soft-thresholding):
    ``sign(x) * relu(|x| - (|x| + 1e-8)^(p - 1) / beta)``, computed in place on temporaries."""
    a = x.abs()
    t = (a + 1e-8).pow_(p - 1).mul_(1.0 / beta)
    return torch.sign(x).mul_(torch.relu_(a.sub_(t)))


def _solve_zero(g: torch.Tensor, inv: torch.Tensor, zero: torch.Tensor, qmax: float, cfg: HQQConfig) -> torch.Tensor:
    """Half-quadratic iterations on the zero point of every group of ``g`` [N', G, gs]."""
    beta = cfg.beta
    best = float("inf")
    best_err = best_zero = None
    for _ in range(cfg.iters):
        q = (g * inv).add_(zero).round_().clamp_(0, qmax)
        d = g - (q - zero).div_(inv)  # the weight's error at this zero point
        if cfg.early_stop:  # the reference: stop when the tensor's mean |error| stops falling
            err = float(d.abs().mean())
            stop = not err < best
            best = min(best, err)
        else:  # keep each group's best iterate
            err = d.abs().mean(-1, keepdim=True)
            if best_err is None:
                best_err, best_zero = err, zero
            else:
                better = err < best_err
                best_err, best_zero = torch.where(better, err, best_err), torch.where(better, zero, best_zero)
        we = _shrink_lp(d, beta, cfg.lp_norm)
        zero = torch.mean(q.sub_((g - we).mul_(inv)), dim=-1, keepdim=True)
        beta *= cfg.kappa
        if cfg.early_stop and stop:
            break  # as the reference does: keep the zero point this last step computed
    return zero if best_zero is None else best_zero


def hqq(w: torch.Tensor, scheme: QuantScheme, cfg: HQQConfig = HQQConfig(), name: str = "weight") -> QuantizedWeight:
    """Quantize ``w`` [N, K] asymmetrically with HQQ-optimised zero points."""
    if scheme.symmetric:
        raise ValueError(f"{name}: HQQ optimises the zero point; use symmetric: false")
    scheme.check_shape(w.shape, name)
    g = _grouped(w.float(), scheme)  # [N', G, gs]
    qmax = float((1 << scheme.bits) - 1)  # unsigned grid [0, 2^b - 1] while solving
    lo0, hi0 = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best_err = best_zero = best_inv = None
    for r in cfg.shrink:  # each group starts from the range whose plain rounding fits it best (l_p error)
        lo, hi = lo0 * r, hi0 * r
        inv = (qmax / (hi - lo)).clamp(max=2e4)  # 1 / scale, as the reference keeps it (a flat group: 2e4)
        zero = -lo * inv
        if len(cfg.shrink) == 1:
            best_zero, best_inv = zero, inv
            break
        err = ((torch.round(g * inv + zero).clamp(0, qmax) - zero) / inv - g).abs().pow(cfg.lp_norm).mean(-1, keepdim=True)
        if best_err is None:
            best_err, best_zero, best_inv = err, zero, inv
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_zero = torch.where(better, zero, best_zero)
            best_inv = torch.where(better, inv, best_inv)
    best_zero = _solve_zero(g, best_inv, best_zero, qmax, cfg)
    scale = 1.0 / best_inv
    zero = best_zero
    if cfg.int_zero:
        zero = torch.round(zero).clamp(0, qmax)
        q = torch.round(g / scale + zero).clamp(0, qmax)
        # least-squares scale for the fixed integers and zero point: s = <w, q - z> / |q - z|^2
        d = q - zero
        num, den = (g * d).sum(-1, keepdim=True), (d * d).sum(-1, keepdim=True)
        scale = torch.where(den > 0, num / den.clamp(min=1e-12), scale).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(g / scale + zero).clamp(0, qmax)
    off = float(1 << (scheme.bits - 1))  # unsigned -> the signed convention of QuantizedWeight
    qdata = _ungrouped((q - off).to(torch.int8), w.shape, scheme)
    zq = zero - off
    shape = scale.shape[:2]  # [N', G]
    scale = scale.reshape(shape)
    zq = zq.reshape(shape).to(torch.int8) if cfg.int_zero else zq.reshape(shape)
    if scheme.strategy == "tensor":
        scale, zq = scale.reshape(1), zq.reshape(1)
    return QuantizedWeight(qdata, scale.to(w.dtype), zq, scheme)
