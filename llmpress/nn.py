"""Modules that carry compressed weights. The forward here is the pure-torch reference path
(dequantize, then matmul); faster kernels plug in behind the same module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.lowrank.svd import LowRankWeight
from llmpress.quant.act import ActScheme, fake_quant
from llmpress.quant.nf4 import CodebookWeight
from llmpress.quant.primitives import QuantizedWeight, QuantScheme


class CompressedLinear(nn.Module):
    """y = x W^T + b with W held compressed; subclasses say how (``qweight``, ``weight``).
    With ``act`` the input is quantized too (W8A8), using ``input_scale`` when static."""

    def __init__(self, shape: torch.Size, bias: torch.Tensor | None, info: dict) -> None:
        super().__init__()
        self.act: ActScheme | None = None
        self.register_buffer("input_scale", None)
        self.out_features, self.in_features = shape
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.info = dict(info)

    @property
    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = fake_quant(x, self.act, self.input_scale)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}"


class QuantLinear(CompressedLinear):
    """W as a :class:`QuantizedWeight` (int8 integers or FP8 values in buffers)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                 act: ActScheme | None = None, input_scale: torch.Tensor | None = None) -> None:
        super().__init__(qw.shape, bias, qw.info)
        self.act = act
        if act is not None and not act.dynamic and input_scale is None:
            raise ValueError("a static activation scheme needs input_scale")
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float().reshape(1))
        self.scheme: QuantScheme = qw.scheme
        self.register_buffer("qdata", qw.qdata)
        self.register_buffer("scale", qw.scale)
        self.register_buffer("zero", qw.zero)

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qdata, self.scale, self.zero, self.scheme, self.info)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized [out, in] weight in the scale's dtype."""
        return self.qweight.dequantize(self.scale.dtype)

    def describe(self) -> str:
        return self.scheme.describe() + ("" if self.act is None else f", act {self.act.describe()}")


class CodebookLinear(CompressedLinear):
    """W as a :class:`~llmpress.quant.nf4.CodebookWeight` (NF4 / FP4 code-book indices, absmax
    per block, optionally double-quantized absmax)."""

    def __init__(self, cw: CodebookWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__(cw.shape, bias, cw.info)
        self.quant_type, self.blocksize, self.offset = cw.quant_type, cw.blocksize, cw.offset
        self.blocksize2, self.dtype = cw.blocksize2, cw.dtype
        self.register_buffer("codes", cw.codes)
        self.register_buffer("absmax", cw.absmax)
        self.register_buffer("absmax2", cw.absmax2)

    @property
    def qweight(self) -> CodebookWeight:
        return CodebookWeight(self.codes, self.absmax, self.quant_type, self.blocksize, self.absmax2,
                              self.offset, self.blocksize2, self.dtype, self.info)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def describe(self) -> str:
        return self.qweight.describe()



class LowRankLinear(CompressedLinear):
    """W = A @ B held as its two factors (``a`` [out, r], ``b`` [r, in]); the forward runs the
    two thin matmuls, so compute drops with the rank as well as storage."""

    def __init__(self, lw: LowRankWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__(lw.shape, bias, lw.info)
        self.a = nn.Parameter(lw.a.detach().contiguous(), requires_grad=False)
        self.b = nn.Parameter(lw.b.detach().contiguous(), requires_grad=False)

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def qweight(self) -> LowRankWeight:
        return LowRankWeight(self.a.data, self.b.data, self.info)

    @property
    def weight(self) -> torch.Tensor:
        return self.a @ self.b

    def describe(self) -> str:
        return f"rank {self.rank}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(x, self.b.to(x.dtype)), self.a.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)
