"""CPU weight-only matmuls through PyTorch's own kernels (``_weight_int4pack_mm_for_cpu``,
``_weight_int8pack_mm``): integer weights of up to 4 bits with groups of 32..256 along K, and
symmetric per-channel int8. They are fast only for bf16 activations (for float32 they run
10-50x slower than a dense float32 matmul here), so the dispatcher sends bf16 inputs alone; the
speed ratios are in BENCHMARKS.md (``bench/kernels.py --cpu``).

PyTorch's int4 convention is w = (u - 8) * scale + zero with a float ``zero``; an llmpress code
u with zero point zu maps to zero = (8 - zu) * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.kernels.layout import UnsupportedLayout
from llmpress.quant.primitives import QuantizedWeight

INT4_GROUPS = (32, 64, 128, 256)


@dataclass
class CpuPacked:
    kind: str  # "int4" or "int8"
    data: torch.Tensor
    params: torch.Tensor  # int4: scales_and_zeros [G, N, 2]; int8: scales [N]
    group_size: int
    n: int
    k: int


def pack_cpu(qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> CpuPacked:
    s = qw.scheme
    n, k = qw.shape
    if s.type != "int" or s.group_axis != 1:
        raise UnsupportedLayout(f"{s.describe()}: no PyTorch CPU kernel")
    if s.bits == 8 and s.symmetric and s.strategy == "channel":
        return CpuPacked("int8", qw.qdata.contiguous(), qw.scale.reshape(n).to(dtype).contiguous(), k, n, k)
    if s.bits <= 4 and s.strategy == "group" and s.group_size in INT4_GROUPS and k % 16 == 0:
        off = 1 << (s.bits - 1)
        u = qw.qdata.to(torch.int32) + off  # codes in [0, 2^bits) ⊆ [0, 16)
        scale = qw.scale.float().reshape(n, -1)
        zu = torch.full_like(scale, float(off)) if qw.zero is None else qw.zero.float().reshape(n, -1) + off
        zero = (8.0 - zu) * scale
        data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2)
        params = torch.stack([scale.t(), zero.t()], -1).to(dtype).contiguous()
        return CpuPacked("int4", data, params, s.group_size, n, k)
    raise UnsupportedLayout(f"{s.describe()}: PyTorch's CPU kernels take int<=4 groups of 32..256 or int8 per-channel sym")


def matmul(x: torch.Tensor, p: CpuPacked, bias: torch.Tensor | None = None) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.k).contiguous()
    if p.kind == "int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, p.data, p.group_size, p.params)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, p.data, p.params)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, p.n)
