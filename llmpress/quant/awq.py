"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978), Sec. 3.2.

Pure functions on tensors. For the linears that read one input ``x`` (e.g. q/k/v after the
attention norm) AWQ scales input channel ``j`` of every weight by ``s_j`` and divides the
op that produces ``x`` by ``s_j``, so the float model is unchanged while salient channels
(large mean ``|x_j|``) get a finer effective grid. ``s = mean|x|^alpha`` with ``alpha`` chosen
on a grid to minimise the output error of the quantized layers.

The output error of a layer with input rows ``X`` and weight error ``E = W - Q`` is
``||X E^T||^2 = tr(E H E^T) * n / 2`` with ``H = 2/n X^T X``, the statistic GPTQ uses, so
the search needs no stored activations: one calibration pass gives ``H`` and ``mean|x|``.
"""

from __future__ import annotations

from typing import Callable

import torch

QuantFn = Callable[[torch.Tensor], torch.Tensor]  # fake-quantize a weight [N, K] -> [N, K]


def output_error(e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``tr(E H E^T)`` for a weight error ``E`` [N, K] and input second moment ``H`` [K, K]."""
    return ((e @ h) * e).sum()


def expand_scale(s: torch.Tensor, rep: int, head_dim: int | None) -> torch.Tensor:
    """Scale per producer output channel [C] -> per consumer input channel [C * rep].

    With grouped-query attention each value head feeds ``rep`` query heads, so the o-proj input
    channel ``(h, d)`` reads value channel ``(h // rep, d)``."""
    if rep == 1:
        return s
    assert head_dim is not None and s.numel() % head_dim == 0
    kv = s.numel() // head_dim
    return s.reshape(kv, 1, head_dim).expand(kv, rep, head_dim).reshape(-1)


def reduce_absmean(x_absmean: torch.Tensor, rep: int, head_dim: int | None) -> torch.Tensor:
    """Inverse of :func:`expand_scale` for the statistic: average over the ``rep`` heads."""
    if rep == 1:
        return x_absmean
    kv = x_absmean.numel() // (rep * head_dim)
    return x_absmean.reshape(kv, rep, head_dim).mean(1).reshape(-1)


def search_scale(
    weights: list[torch.Tensor],
    hessians: list[torch.Tensor],
    quant_fns: list[QuantFn],
    x_absmean: torch.Tensor,
    n_grid: int = 20,
    rep: int = 1,
    head_dim: int | None = None,
) -> tuple[torch.Tensor, float, dict]:
    """Best AWQ scale for a group of linears sharing one (scalable) input.

    ``weights[i]`` [N_i, K]; ``hessians[i]`` [K, K]; ``x_absmean`` [K / rep] is mean ``|x|`` per
    channel of the producer's output. Returns ``(s, alpha, info)`` with ``s`` [K / rep]
    (``alpha = 0`` gives ``s = 1``: plain rounding is always a candidate, so the chosen scale
    never has a larger output error than no scaling)."""
    ws = [w.float() for w in weights]
    hs = [h.float() for h in hessians]
    xm = x_absmean.float().clamp(min=1e-6)
    best = (torch.ones_like(xm), 0.0, float("inf"))
    base_err = None
    for i in range(n_grid):
        alpha = i / n_grid
        s = xm.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # keep the scales centred around 1
        se = expand_scale(s, rep, head_dim)
        err = 0.0
        for w, h, q in zip(ws, hs, quant_fns, strict=True):
            e = w - q(w * se) / se  # [N, K]: error of the scaled, quantized, unscaled weight
            err += float(output_error(e, h))
        if i == 0:
            base_err = err
        if err < best[2]:
            best = (s, alpha, err)
    s, alpha, err = best
    return s, alpha, dict(awq_alpha=alpha, awq_err_ratio=err / base_err if base_err else 1.0)
