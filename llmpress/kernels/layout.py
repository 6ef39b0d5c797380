"""The weight layout the GPU kernels read, and its pure-torch reference matmul.

A checkpoint holds a weight as int8 integers [N, K] with scales [N, G] (``QuantizedWeight``) or
as 4-bit code-book indices with an absmax per block (``CodebookWeight``). The kernels want
something else: codes packed along K into int32 words, ``32 / bits`` per word, laid out
[N, Kp / per_word] (each output column's codes contiguous along K, so a thread reads 16-byte
vectors of one column), and scales / zero points [N, G] in the activation dtype. :func:`pack`
builds that once, when a layer first runs on the GPU; :func:`reference_matmul` is the
pure-torch meaning of the layout, which the Triton kernel is tested against (on the CPU
through Triton's interpreter, on the GPU on fresh random shapes).

The stored value of a code ``u`` (unsigned) in group ``g`` of column ``n`` is
``(u - zero[n, g]) * scale[n, g]`` for integer weights, and ``lut[u] * scale[n, g]`` for a
code book (NF4 / FP4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from llmpress.quant.nf4 import CodebookWeight, code
from llmpress.quant.pack import pack_int32, unpack_int32
from llmpress.quant.primitives import QuantizedWeight

PAD_K = 128  # packed K is padded to this multiple so any kernel tile divides it


class UnsupportedLayout(ValueError):
    """The kernels cannot run this weight; callers fall back to the reference path."""


@dataclass
class PackedWeight:
    """A weight in the kernels' layout (see the module docstring).

    qw: int32 [N, Kp / per_word]; scale: [N, G]; zero: [N, G] float (integer schemes) or None
    (code books); lut: float32 [16] for code books, else None; group_size: K for per-channel.

    kmajor: the same words and group parameters stored transposed, qw [Kp / per_word, N] and
    scale / zero [G, N] (each word row one coalesced line across the columns), which the
    one-row kernel reads at a higher share of the bandwidth (the default for 4-bit integer
    codes). ``qw_nk`` / ``scale_ng`` / ``zero_ng`` are [N, ...] views in either case.
    """

    qw: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    lut: torch.Tensor | None
    bits: int  # bits per code slot: 4 or 8 (2- and 3-bit weights use 4-bit slots)
    group_size: int
    n: int
    k: int
    kmajor: bool = False

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def qw_nk(self) -> torch.Tensor:
        """The words as an [N, Kp / per_word] view."""
        return self.qw.t() if self.kmajor else self.qw

    @property
    def scale_ng(self) -> torch.Tensor:
        return self.scale.t() if self.kmajor else self.scale

    @property
    def zero_ng(self) -> torch.Tensor | None:
        return None if self.zero is None else (self.zero.t() if self.kmajor else self.zero)

    def clone(self) -> PackedWeight:
        """A copy with its own storage (benchmarks rotate copies to defeat the L2 cache)."""
        cl = (lambda t: None if t is None else t.clone())
        return dataclasses.replace(self, qw=cl(self.qw), scale=cl(self.scale), zero=cl(self.zero))

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight (codes, scales, zero points)."""
        return sum(t.numel() * t.element_size() for t in (self.qw, self.scale, self.zero) if t is not None)

    def to(self, device: torch.device | str) -> PackedWeight:
        mv = (lambda t: None if t is None else t.to(device))
        return dataclasses.replace(self, qw=mv(self.qw), scale=mv(self.scale), zero=mv(self.zero), lut=mv(self.lut))


def _pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N, K] (0 <= u < 2^bits, bits 4 or 8) → int32 [N, Kp / per_word]: word r of
    column n holds the codes of k = r * per_word + j at bit offset j * bits (compressed-tensors'
    packing, :func:`~llmpress.quant.pack.pack_int32`, which for these widths never straddles a
    word); K padded with zero codes to a multiple of PAD_K (128)."""
    n, k = u.shape
    kp = -(-k // PAD_K) * PAD_K
    half = 1 << (bits - 1)
    signed = torch.nn.functional.pad(u.to(torch.int16) - half, (0, kp - k), value=-half).to(torch.int8)
    return pack_int32(signed, bits)


def unpack_codes(qw: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of the packing: int32 [N, Kp / per_word] → int64 codes [N, K]."""
    kp = qw.shape[1] * (32 // bits)
    return unpack_int32(qw, bits, (qw.shape[0], kp))[:, :k].to(torch.int64) + (1 << (bits - 1))


def pack(weight: QuantizedWeight | CodebookWeight, dtype: torch.dtype = torch.bfloat16,
         kmajor: bool | None = None) -> PackedWeight:
    """The kernel layout of ``weight``, with scales in ``dtype`` (the activations' dtype);
    K-major (see :class:`PackedWeight`) for integer codes in 4-bit slots unless ``kmajor`` says
    otherwise (code books and 8-bit slots are always N-major). Raises
    :class:`UnsupportedLayout` for what the kernels do not cover (FP8 values, groups along the
    output dimension, a code-book block that does not tile the rows)."""
    if isinstance(weight, CodebookWeight):
        n, k = weight.shape
        if k % weight.blocksize:
            raise UnsupportedLayout(f"code-book blocks of {weight.blocksize} do not tile rows of {k}")
        scale = weight.absmax_fp32().reshape(n, k // weight.blocksize).contiguous().to(dtype)
        return PackedWeight(_pack_codes(weight.codes, 4), scale, None, code(weight.quant_type).to(weight.codes.device),
                            4, weight.blocksize, n, k)
    s = weight.scheme
    if s.type != "int":
        raise UnsupportedLayout(f"{s.describe()}: the W*A16 kernels take integer weights")
    if s.group_axis == 0:
        raise UnsupportedLayout("groups along the output dimension (HQQ axis 0)")
    slot = 4 if s.bits <= 4 else 8  # 2- and 3-bit codes ride in 4-bit slots, 5..7 in 8-bit ones
    n, k = weight.shape
    off = 1 << (s.bits - 1)  # signed grid [qmin, qmax] → unsigned codes [0, 2^bits)
    u = weight.qdata.to(torch.int16) + off
    gs = s.group_size if s.strategy == "group" else k
    g = k // gs
    scale = weight.scale.float().reshape(-1, 1).expand(n, 1) if s.strategy == "tensor" else weight.scale.float()
    scale = scale.reshape(n, g)
    if weight.zero is None:
        zero = torch.full((n, g), float(off), device=scale.device)
    else:
        zero = weight.zero.float().reshape(-1, 1).expand(n, 1) if s.strategy == "tensor" else weight.zero.float()
        zero = zero.reshape(n, g) + off
    p = PackedWeight(_pack_codes(u, slot), scale.contiguous().to(dtype), zero.contiguous().to(dtype),
                     None, slot, gs, n, k)
    if kmajor is None:
        kmajor = slot == 4
    if kmajor:
        if slot != 4:
            raise UnsupportedLayout("the K-major layout holds 4-bit code slots only")
        p = dataclasses.replace(p, qw=p.qw.t().contiguous(), scale=p.scale.t().contiguous(),
                                zero=p.zero.t().contiguous(), kmajor=True)
    return p


def cat(parts: list[PackedWeight]) -> PackedWeight:
    """Packed weights of one input width stacked along the output dimension (one matmul for
    q/k/v or gate/up): same bits, group size, layout and scale dtype; raises
    :class:`UnsupportedLayout` otherwise."""
    def key(p: PackedWeight) -> tuple:
        return p.bits, p.group_size, p.k, p.kmajor, p.scale.dtype, p.scale.device, p.lut is None, p.zero is None

    a = parts[0]
    for b in parts[1:]:
        if key(b) != key(a):
            raise UnsupportedLayout("packed weights of different bits, groups, widths or layouts do not stack")
        if a.lut is not None and not torch.equal(a.lut, b.lut):
            raise UnsupportedLayout("different code books do not stack")
    d = 1 if a.kmajor else 0  # the output dimension of the stored tensors
    stack = (lambda ts: None if ts[0] is None else torch.cat(ts, d).contiguous())
    return dataclasses.replace(a, qw=stack([p.qw for p in parts]), scale=stack([p.scale for p in parts]),
                               zero=stack([p.zero for p in parts]), n=sum(p.n for p in parts))


def dequantize(p: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight the layout stands for (pure torch)."""
    u = unpack_codes(p.qw_nk.contiguous(), p.bits, p.k).float()
    s = p.scale_ng.float().repeat_interleave(p.group_size, dim=1)[:, : p.k]
    if p.lut is not None:
        return (p.lut.float()[u.long()] * s).to(dtype)
    z = p.zero_ng.float().repeat_interleave(p.group_size, dim=1)[:, : p.k]
    return ((u - z) * s).to(dtype)


def reference_matmul(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ b) for x [..., K], computed in float32 and returned in x's dtype."""
    y = x.float() @ dequantize(p).t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
