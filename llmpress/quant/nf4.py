"""4-bit code-book quantization as bitsandbytes defines it: NF4 (Dettmers et al. 2023, QLoRA,
arXiv:2305.14314) and FP4 (E2M1), absmax scaling per block of 64 weights, and double
quantization of those absmax values (8-bit dynamic code, blocks of 256, mean offset).

Numerically identical to bitsandbytes (same code books, same rounding: midpoints between
sorted code values, ties to the lower value; absmax scaling by multiplying with the reciprocal),
checked against bitsandbytes itself by ``bench/peers/bnb_nf4_check.py``. Pure functions; the
result is a :class:`CodebookWeight`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, Appendix E), as bitsandbytes stores them
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# FP4 E2M1 in bitsandbytes' bit order (sign bit 3): 0, 0.0625, 8, 12, 4, 6, 2, 3, then negated;
# normalised by the largest magnitude (12)
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE = tuple(v / 12.0 for v in _FP4_RAW) + tuple(-v / 12.0 for v in _FP4_RAW)
CODE_TYPES = ("nf4", "fp4")


def code(quant_type: str) -> torch.Tensor:
    if quant_type not in CODE_TYPES:
        raise ValueError(f"quant_type={quant_type!r}; allowed: {CODE_TYPES}")
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32)


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """A copy of :func:`_dynamic_code` (cached: it is built from Python lists)."""
    return _dynamic_code(max_exponent_bits, total_bits).clone()


@functools.lru_cache(maxsize=4)
def _dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (Dettmers 2016, "8-bit approximations"):
    for each decimal exponent ``10^(i-6)``, ``2^i`` linearly spaced fractions in (0.1, 1]
    (midpoints of a linspace), both signs, plus 0 and 1; sorted, 256 values."""
    vals: list[float] = []
    non_sign = total_bits - 1
    for i in range(max_exponent_bits):
        n = 2 ** (i + non_sign - max_exponent_bits) + 1
        b = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        mag = 10 ** (-(max_exponent_bits - 1) + i)
        vals += (mag * means).tolist() + (-mag * means).tolist()  # products in float32, as bitsandbytes
    vals += [0.0, 1.0]
    vals += [0.0] * (2**total_bits - len(vals))
    return torch.tensor(sorted(vals), dtype=torch.float32)


def _blockwise(a: torch.Tensor, cb: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the code book ``cb`` and absmax per block for the flat tensor ``a``."""
    a = a.reshape(-1).float()
    cb = cb.to(a.device)
    n = a.numel()
    full = n - n % blocksize
    blocks = a[:full].reshape(-1, blocksize)  # [n / bs, bs]
    absmax = blocks.abs().amax(-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).unsqueeze(1)), -1, 1).reshape(-1)
    if full < n:  # a last, partial block
        am = a[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / am, -1, 1)])
    order = torch.argsort(cb)
    srt = cb[order]
    idx = torch.bucketize(scaled, (srt[:-1] + srt[1:]) / 2, out_int32=True)  # nearest; a midpoint goes down
    if torch.equal(order, torch.arange(len(cb), device=cb.device)):  # a sorted code book (NF4, the dynamic code)
        return idx.to(torch.uint8), absmax
    return order.to(torch.uint8)[idx], absmax


def _deblockwise(idx: torch.Tensor, absmax: torch.Tensor, cb: torch.Tensor, blocksize: int) -> torch.Tensor:
    v = cb.to(idx.device)[idx.reshape(-1).int()]
    n = v.numel()
    full = n - n % blocksize
    out = torch.empty_like(v)
    torch.mul(v[:full].view(-1, blocksize), absmax[: full // blocksize, None], out=out[:full].view(-1, blocksize))
    if full < n:
        out[full:] = v[full:] * absmax[-1]
    return out


@dataclass
class CodebookWeight:
    """A weight [N, K] as 4-bit code-book indices with absmax per ``blocksize`` consecutive
    values (row-major, as bitsandbytes flattens). With double quantization the absmax values
    are themselves stored as uint8 indices into the dynamic code with fp32 ``absmax2`` per
    256 and a scalar ``offset``."""

    codes: torch.Tensor  # uint8 [N, K], values 0..15
    absmax: torch.Tensor  # fp32 [blocks], or uint8 [blocks] with double quantization
    quant_type: str = "nf4"
    blocksize: int = 64
    absmax2: torch.Tensor | None = None  # fp32 [ceil(blocks / 256)]
    offset: float = 0.0
    blocksize2: int = 256
    dtype: torch.dtype = torch.float32
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def absmax_fp32(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax.float()
        return _deblockwise(self.absmax, self.absmax2, dynamic_code(), self.blocksize2) + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = _deblockwise(self.codes, self.absmax_fp32(), code(self.quant_type), self.blocksize)
        return w.reshape(self.shape).to(dtype or self.dtype)

    def storage_bits(self) -> int:
        bits = self.codes.numel() * 4
        bits += self.absmax.numel() * (8 if self.double_quant else 32)
        if self.double_quant:
            bits += self.absmax2.numel() * 32 + 32
        return bits

    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.codes.numel()

    def to(self, device: torch.device | str) -> CodebookWeight:
        return CodebookWeight(self.codes.to(device), self.absmax.to(device), self.quant_type, self.blocksize,
                              None if self.absmax2 is None else self.absmax2.to(device), self.offset,
                              self.blocksize2, self.dtype, self.info)

    def describe(self) -> str:
        return f"{self.quant_type} b{self.blocksize}{' dq' if self.double_quant else ''}"


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True, name: str = "weight") -> CodebookWeight:
    """bitsandbytes ``quantize_4bit(w, blocksize, quant_type, compress_statistics=double_quant)``."""
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"{name}: blocksize={blocksize} is not one bitsandbytes supports (32..4096, powers of 2)")
    if w.numel() % 2:
        raise ValueError(f"{name}: {w.numel()} weights cannot pack two per byte")
    idx, absmax = _blockwise(w, code(quant_type), blocksize)
    out = CodebookWeight(idx.reshape(w.shape), absmax, quant_type, blocksize, dtype=w.dtype)
    if double_quant:
        offset = absmax.mean()
        qa, absmax2 = _blockwise(absmax - offset, dynamic_code(), 256)
        out.absmax, out.absmax2, out.offset = qa, absmax2, float(offset)
    return out


def nblocks(n: int, blocksize: int) -> int:
    return math.ceil(n / blocksize)
