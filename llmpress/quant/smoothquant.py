"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438), Sec. 4: migrate activation outliers into
the weights with a per-channel scale ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; the
inputs are divided by ``s`` (folded into the producing op), the weight columns multiplied.

``alpha`` (the migration strength) is given, or searched on a grid against the error of the
quantized layer on a subsample of calibration inputs: ``||X W^T - A(X / s) Q(W s)^T||^2`` with
``A`` the activation quantizer and ``Q`` the weight quantizer. ``alpha = 0`` (``s = 1``) is a
candidate, so the search never picks scales worse than no smoothing on that sample.
"""

from __future__ import annotations

from typing import Callable

import torch

from llmpress.quant.act import ActScheme, fake_quant, static_scale


def scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.float().clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def smooth_scale(
    weights: list[torch.Tensor],
    x_absmax: torch.Tensor,
    alpha: float | str,
    xsample: torch.Tensor | None,
    quant_fns: list[Callable[[torch.Tensor], torch.Tensor]],
    act: ActScheme,
    grid: int = 20,
) -> tuple[torch.Tensor, float, dict]:
    """Scale [K] for linears ``weights[i]`` [N_i, K] that read one input; returns
    ``(s, alpha, info)``."""
    w_absmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)  # [K]
    if alpha != "auto":
        return scales(x_absmax, w_absmax, float(alpha)), float(alpha), {"smooth_alpha": float(alpha)}
    if xsample is None:
        raise ValueError("smoothquant 'auto' needs a sample of calibration inputs")
    x = xsample.float()  # [T, K]
    ref = [x @ w.float().t() for w in weights]  # [T, N_i]
    errs: dict[float, tuple[torch.Tensor, float]] = {}

    def err_at(a: float) -> float:
        a = round(a, 6)
        if a not in errs:
            s = scales(x_absmax, w_absmax, a) if a > 0 else torch.ones_like(w_absmax)
            xq = fake_quant(x / s, act, None if act.dynamic else static_scale((x_absmax / s).max(), act))
            errs[a] = (s, sum(float(((xq @ q(w.float() * s).t()) - r).pow(2).sum())
                              for w, q, r in zip(weights, quant_fns, ref)))
        return errs[a][1]

    # coarse to fine: every other point of the grid, then the two neighbours of the best one
    # (the error is smooth in alpha: the same pick as the full grid at ~60% of the cost)
    coarse = [i / grid for i in range(0, grid, 2)]
    a0 = min(coarse, key=err_at)
    for a in (a0 - 1 / grid, a0 + 1 / grid):
        if 0 <= a < 1:
            err_at(a)
    a_best = min(errs, key=lambda k: (errs[k][1], k))
    base = errs[0.0][1]
    best = (errs[a_best][0], a_best, errs[a_best][1])
    s, a, err = best
    return s, a, {"smooth_alpha": a, "smooth_err_ratio": err / base if base else 1.0}
