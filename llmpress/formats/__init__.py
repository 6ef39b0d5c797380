"""Checkpoint writers and readers (no algorithms)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import ModuleType

from torch import nn


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
