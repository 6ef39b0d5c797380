"""Modules that carry compressed weights. The forward here is the pure-torch reference path
(dequantize, then matmul); faster kernels plug in behind the same module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.quant.primitives import QuantizedWeight, QuantScheme


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as a :class:`QuantizedWeight` (int8 integers in buffers)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scheme: QuantScheme = qw.scheme
        self.out_features, self.in_features = qw.shape
        self.register_buffer("qdata", qw.qdata)
        self.register_buffer("scale", qw.scale)
        self.register_buffer("zero", qw.zero)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.info = dict(qw.info)

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qdata, self.scale, self.zero, self.scheme, self.info)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized [out, in] weight in the scale's dtype."""
        return self.qweight.dequantize(self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}"
