"""Dense bit packing of b-bit integers into int32 words (compressed-tensors' pack-quantized).

Along the packed dimension, every 32 consecutive values occupy exactly ``b`` int32 words:
value ``i`` of a 32-run starts at bit ``i * b`` of the run (little-endian within words) and
may straddle two words. Values are stored unsigned (``q + 2**(b-1)``). Rows are padded to a
multiple of 32 values and the trailing words that hold only padding are dropped.
"""

from __future__ import annotations

import math

import torch


def _bit_layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(32, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32  # word index within the run, bit offset within the word


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 ``q`` [R, C] (signed, ``bits`` wide) into int32 [R, ceil(C*bits/32)] (dim=1)
    or [ceil(R*bits/32), C] (dim=0)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int32 needs a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} out of range 1..8")
    v = q.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    runs = math.ceil(cols / 32)
    v = torch.nn.functional.pad(v, (0, runs * 32 - cols)).reshape(rows * runs, 32)  # [R*runs, 32]
    word, off = _bit_layout(bits, v.device)
    out = torch.zeros(rows * runs, bits + 1, dtype=torch.int64, device=v.device)  # +1: spill word
    out.scatter_add_(1, word.expand_as(v), (v << off) & 0xFFFFFFFF)
    out.scatter_add_(1, (word + 1).expand_as(v), v >> (32 - off))  # high bits that straddle
    out = out[:, :bits].reshape(rows, runs * bits)[:, : math.ceil(cols * bits / 32)]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # uint32 -> int32
    return (out.t() if dim == 0 else out).contiguous()


def unpack_int32(p: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words -> int8 [shape] signed integers."""
    if p.dtype != torch.int32 or p.dim() != 2:
        raise ValueError(f"unpack_int32 needs a 2-D int32 tensor, got {p.dtype} {tuple(p.shape)}")
    w = p.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        w = w.t()
    rows, nwords = w.shape
    cols = int(shape[dim])
    runs = math.ceil(cols / 32)
    w = torch.nn.functional.pad(w, (0, runs * bits + 1 - nwords)).contiguous()  # [R, runs*b+1]
    word, off = _bit_layout(bits, w.device)
    idx = (torch.arange(runs, device=w.device) * bits).unsqueeze(1) + word  # [runs, 32]
    lo = w[:, idx] >> off  # [R, runs, 32]
    hi = w[:, idx + 1] << (32 - off)
    v = ((lo | torch.where(off > 0, hi, torch.zeros_like(hi))) & ((1 << bits) - 1))
    v = v.reshape(rows, runs * 32)[:, :cols] - (1 << (bits - 1))
    v = v.to(torch.int8)
    return (v.t() if dim == 0 else v).contiguous()
