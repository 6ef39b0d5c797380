"""Modules that carry compressed weights. The forward here is the pure-torch reference path
(dequantize, then matmul); faster kernels plug in behind the same module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmpress import kernels
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
        if torch.compiler.is_compiling() and getattr(self, "_op_handle", None) is not None:
            # under torch.compile (Runtime(compile=True)): one opaque op, no graph break
            return torch.ops.llmpress.compressed_linear(x, self._op_handle)
        return self.forward_eager(x)

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The forward outside the compiler: a kernel where one applies, else the reference."""
        if x.is_cuda or x.dtype == torch.bfloat16:
            y = kernels.linear(self, x)
            if y is not None:
                return y
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



class LowRankLinear(nn.Module):
    """W = A @ B as two thin linears: ``down`` (B, [r, in]) then ``up`` (A, [out, r], with the
    bias). Compute drops with the rank as well as storage, and each factor is an ordinary
    linear that a later quantization step compresses like any other (``...q_proj.down``)."""

    def __init__(self, lw: LowRankWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        out_f, in_f = lw.shape
        self.out_features, self.in_features = out_f, in_f
        r = lw.rank
        dev, dt = lw.a.device, lw.a.dtype
        self.down = nn.Linear(in_f, r, bias=False, device=dev, dtype=dt)
        self.up = nn.Linear(r, out_f, bias=bias is not None, device=dev, dtype=dt)
        self.down.weight = nn.Parameter(lw.b.detach().contiguous(), requires_grad=False)
        self.up.weight = nn.Parameter(lw.a.detach().contiguous(), requires_grad=False)
        if bias is not None:
            self.up.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.info = dict(lw.info)

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The dense product [out, in] (factors dequantized if they are quantized)."""
        return self.up.weight.float() @ self.down.weight.float()

    def describe(self) -> str:
        return f"rank {self.rank}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
