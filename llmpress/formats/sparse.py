"""Sparse weights on disk: the bitmask layout of compressed-tensors' ``sparse-bitmask`` format.

Per weight ``W`` [rows, cols]: ``{W}.compressed`` (the nonzero values in row-major order, W's
dtype), ``{W}.bitmask`` (uint8 [rows, ceil(cols / 8)], bit ``b`` of byte ``j`` is column
``8j + b``), ``{W}.row_offsets`` (int64 [rows], where each row starts in ``compressed``) and
``{W}.shape``. A 50%-sparse fp32 weight takes 17 bits per entry instead of 32. compressed-tensors
dropped its reader for this legacy format after 0.14, so these checkpoints load through llmpress
(``llmpress.load``); save dense for engines that do not read it.
"""

from __future__ import annotations

import torch
from torch import nn

SPARSE_MIN = 0.3  # plain linear weights with at least this fraction of zeros are stored as bitmasks
SUFFIXES = (".compressed", ".bitmask", ".row_offsets", ".shape")
_BITS = 1 << torch.arange(8, dtype=torch.int32)


def compress(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four tensors of ``w`` in the bitmask layout (``name`` is the weight's key)."""
    if w.dim() != 2:
        raise ValueError(f"{name}: bitmask storage takes 2-D weights, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    mask = w != 0
    pad = (-cols) % 8
    m = torch.nn.functional.pad(mask, (0, pad)).reshape(rows, -1, 8).to(torch.int32)  # [R, C/8, 8]
    bitmask = (m * _BITS).sum(-1).to(torch.uint8)
    counts = mask.sum(1)
    offsets = torch.cumsum(counts, 0) - counts
    return {f"{name}.compressed": w[mask].contiguous(), f"{name}.bitmask": bitmask,
            f"{name}.row_offsets": offsets.to(torch.int64), f"{name}.shape": torch.tensor([rows, cols], dtype=torch.int64)}


def decompress(name: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dense ``name`` from its bitmask tensors (popped from ``t``), exactly as it was saved."""
    rows, cols = (int(x) for x in t.pop(f"{name}.shape"))
    bits = t.pop(f"{name}.bitmask").to(torch.int32).unsqueeze(-1)  # [R, C/8, 1]
    mask = ((bits & _BITS) != 0).reshape(rows, -1)[:, :cols]
    values = t.pop(f"{name}.compressed")
    t.pop(f"{name}.row_offsets")
    if int(mask.sum()) != values.numel():
        raise ValueError(f"{name}: bitmask marks {int(mask.sum())} values but {values.numel()} are stored")
    out = torch.zeros(rows, cols, dtype=values.dtype)
    out[mask] = values
    return out


def sparsity(w: torch.Tensor) -> float:
    return float((w == 0).float().mean())


def structure(ws: list[torch.Tensor]) -> str:
    """``"2:4"`` when every weight keeps at most 2 of each 4 consecutive inputs, else
    ``"unstructured"``."""
    for w in ws:
        if w.shape[1] % 4 or ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) > 2).any():
            return "unstructured"
    return "2:4" if ws else "unstructured"


def sparse_linears(model: nn.Module, skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Plain linear weights worth storing as bitmasks: name of the weight -> weight."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n not in skip and m.weight.dim() == 2 and sparsity(m.weight) >= SPARSE_MIN:
            out[f"{n}.weight"] = m.weight.detach().cpu()
    return out


def counts(weights: dict[str, torch.Tensor], prefix: str = "") -> dict[str, list]:
    """Per weight (named ``prefix + name``): [zeros, elements, structure], what
    :func:`config_from_counts` needs; small enough to keep after the weights are gone."""
    return {f"{prefix}{k}": [int((w == 0).sum()), w.numel(), structure([w])] for k, w in weights.items()}


def config_from_counts(c: dict[str, list]) -> dict:
    """The ``sparsity_config`` of the weights ``c`` counts ({} for none)."""
    if not c:
        return {}
    zeros = sum(z for z, _, _ in c.values())
    total = sum(n for _, n, _ in c.values())
    return {"format": "sparse-bitmask", "global_sparsity": zeros / max(total, 1),
            "sparsity_structure": "2:4" if all(s == "2:4" for *_, s in c.values()) else "unstructured",
            "targets": sorted(k[: -len(".weight")] for k in c), "ignore": [],
            "registry_requires_subclass": False}


def sparsity_config(weights: dict[str, torch.Tensor]) -> dict:
    return config_from_counts(counts(weights))
