"""Checkpoint writers and readers (no algorithms)."""

from __future__ import annotations

from types import ModuleType

from torch import nn


def layout_for(model: nn.Module) -> ModuleType:
    """The checkpoint layout that holds ``model``'s compressed layers: bitsandbytes for NF4 /
    FP4 code books, compressed-tensors for everything else."""
    from llmpress.formats import bnb, compressed_tensors
    from llmpress.nn import CodebookLinear, QuantLinear

    kinds = {type(m) for m in model.modules() if isinstance(m, (QuantLinear, CodebookLinear))}
    if kinds == {QuantLinear, CodebookLinear}:
        raise ValueError("this model mixes NF4/FP4 layers (bitsandbytes layout) with integer/FP8 layers "
                         "(compressed-tensors): no checkpoint format holds both; use one kind per model")
    return bnb if CodebookLinear in kinds else compressed_tensors
