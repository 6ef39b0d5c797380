"""GGUF mixes planned per tensor: instead of llama.cpp's fixed rules (Q4_K_M: Q6_K on some
``attn_v`` / ``ffn_down`` layers, the base type elsewhere), choose each block linear's GGML type
for a budget from its measured sensitivity.

The measurement is the one ``llmpress plan`` uses (one forward + backward pass: each input's
second moment ``A`` and each output's Fisher diagonal ``G``); every GGML type whose blocks tile
the layer's rows is a candidate, quantized by the same solver the export runs (importance-weighted
by ``diag(A)``), and its predicted KL is the K-FAC term of its real rounding error. The
multiple-choice knapsack of :func:`llmpress.plan.allocate` then picks the types.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.models import linear_weight
from llmpress.plan.sensitivity import Option, Sensitivity, Unit, _fisher_pass, _targets, kfac_kl
from llmpress.recipe import QuantStep

log = logging.getLogger(__name__)

TYPES = ("q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0")


def _block(t: str) -> tuple[int, int]:
    from llmpress.quant import ggml, kquants

    return (256, kquants.SPECS[t].size) if t in kquants.SPECS else ggml.BLOCK[t]


def quantize_dequantize(w: torch.Tensor, t: str, imp: torch.Tensor | None) -> torch.Tensor:
    """``w`` rounded onto GGML type ``t`` the way the export writes it, back in float32."""
    import gguf
    import numpy as np

    from llmpress.quant import ggml, kquants

    if t in kquants.SPECS:
        b = kquants.quantize_rows(w, t, imp)
    elif imp is not None:
        b = kquants.quantize_legacy_weighted(w, t, imp)
    else:
        b = ggml.quantize_rows(w, t)
    y = gguf.quants.dequantize(np.asarray(b.numpy()), getattr(gguf.GGMLQuantizationType, t.upper()))
    return torch.from_numpy(y).reshape(w.shape).to(w.device)


@torch.no_grad()
def measure_gguf(model: nn.Module, tokens: torch.Tensor, types: Sequence[str] = TYPES, *, batch_size: int = 2,
                 seed: int = 0, progress: bool = True, name: str = "model") -> Sensitivity:
    """Predicted KL and GGUF bytes of every block linear at every GGML type in ``types`` whose
    block size divides its rows. An option's ``bits`` field holds the index of its type in
    ``types`` (``Sensitivity.meta['types']``)."""
    t0 = time.perf_counter()
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise ValueError(f"GGML types {unknown} cannot be planned; allowed: {list(TYPES)}")
    mods = _targets(model, QuantStep(method="rtn"))
    for n, m in mods.items():
        if not torch.isfinite(linear_weight(m)).all():
            raise ValueError(f"{n}: weight contains NaN or inf; refusing to plan a corrupted model")
    hess, fisher, owner, n_tok = _fisher_pass(model, mods, tokens, batch_size, seed, progress)
    units = []
    bar = tqdm(total=len(mods) * len(types), desc=f"gguf sensitivity: {len(types)} types", unit="solve",
               disable=not progress)
    for n, m in mods.items():
        w = linear_weight(m).detach().float()
        h = hess[owner[n]]
        imp = torch.diag(h) / 2  # mean squared input per column
        blk = next((int(p) for p in n.split(".") if p.isdigit()), None)
        u = Unit((n,), blk, w.numel())
        for j, t in enumerate(types):
            bs, size = _block(t)
            if w.shape[1] % bs:
                bar.update(1)
                continue
            y = quantize_dequantize(w, t, imp)
            u.options.append(Option(j, bs, w.shape[0] * w.shape[1] // bs * size,
                                    kfac_kl(y - w, h, fisher[n].to(h.device))))
            bar.update(1)
        if not u.options:
            raise ValueError(f"{n}: no GGML type in {list(types)} tiles rows of {w.shape[1]}")
        units.append(u)
    bar.close()
    return Sensitivity(name, QuantStep(method="rtn").to_dict(), units, 0, sum(u.params * 4 for u in units), n_tok,
                       time.perf_counter() - t0, {"types": list(types), "gguf": True})


def plan_types(plan) -> dict[str, str]:
    """A plan over a GGUF sensitivity -> {linear module name: GGML type}."""
    types = plan.sens.meta["types"]
    return {u.names[0]: types[plan.option(i).bits] for i, u in enumerate(plan.sens.units)}
