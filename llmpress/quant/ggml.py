"""GGML block quantization (the tensor types of GGUF files, as llama.cpp defines them), in torch.

Each type cuts a row into blocks of 32 values and stores per block an fp16 scale ``d`` (and
for the ``_1`` types an fp16 minimum ``m``) followed by the packed integers:

- ``Q8_0``: ``d = max|x| / 127``, ``q = round_away(x / d)`` (int8), 34 bytes per block.
- ``Q4_0`` / ``Q5_0``: ``d = x[argmax|x|] / -8`` (``/ -16``), ``q = trunc(x / d + 8.5)``
  (``+ 16.5``) clipped to 4 (5) bits; 18 (22) bytes.
- ``Q4_1`` / ``Q5_1``: ``d = (max - min) / 15`` (``/ 31``), ``m = min``,
  ``q = trunc((x - m) / d + 0.5)``; 20 (24) bytes.

Bit-identical to the reference quantizers in ggml-quants.c (checked against the ``gguf``
package's numpy port in the tests). Pure functions: rows [R, K] in, bytes [R, K / 32 * size] out.
"""

from __future__ import annotations

import torch

QK = 32  # values per block of the legacy types
# type -> (values per block, bytes per block)
BLOCK = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
         "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2)}
TYPES = tuple(BLOCK)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: halves away from zero, computed like the reference (no ``x + 0.5`` error)."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[n, 1] float32 -> [n, 2] little-endian fp16 bytes."""
    return v.to(torch.float16).contiguous().view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] values < 16 (low 4 bits used) -> [n, 16] bytes: value j in the low nibble of byte
    j, value 16 + j in its high nibble."""
    q = q.to(torch.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] 5-bit values -> [n, 4] bytes holding bit 4 of each value, value i at bit i % 8
    of byte i // 8 (a little-endian uint32)."""
    bits = ((q.to(torch.int32) >> 4) & 1).view(-1, 4, 8)
    return (bits << torch.arange(8, dtype=torch.int32, device=q.device)).sum(-1).to(torch.uint8)


def pack_block(qtype: str, d: torch.Tensor, q: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """Scales d [n, 1] (and minima m, ``_1`` types), stored integers q [n, 32] (unsigned for the
    4/5-bit types, signed for Q8_0) -> [n, bytes per block] uint8."""
    if qtype == "q8_0":
        return torch.cat([_f16_bytes(d), q.to(torch.int8).view(torch.uint8)], -1)
    head = [_f16_bytes(d)] if m is None else [_f16_bytes(d), _f16_bytes(m)]
    if qtype in ("q4_0", "q4_1"):
        return torch.cat([*head, _nibbles(q)], -1)
    return torch.cat([*head, _high_bits(q), _nibbles(q)], -1)


def quantize_blocks(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """Blocks [n, 32] (float32) -> [n, bytes per block] uint8 of GGML type ``qtype``."""
    x = x.float()
    if qtype == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        return pack_block(qtype, d, _roundf(x * _inv(d)))
    if qtype in ("q4_0", "q5_0"):
        lev = 8 if qtype == "q4_0" else 16
        mx = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))  # the signed value of largest magnitude
        d = mx / -lev
        return pack_block(qtype, d, torch.trunc(x * _inv(d) + (lev + 0.5)).clamp(0, 2 * lev - 1))
    if qtype in ("q4_1", "q5_1"):
        top = 15 if qtype == "q4_1" else 31
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / top
        return pack_block(qtype, d, torch.trunc((x - lo) * _inv(d) + 0.5).clamp(0, top), lo)
    raise ValueError(f"GGML type {qtype!r} has no block quantizer here; allowed: {[t for t in TYPES if t[0] == 'q']}")


def quantize_rows(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """A weight [R, K] as GGML ``qtype`` bytes [R, K / block * bytes per block] (uint8)."""
    if qtype not in BLOCK:
        raise ValueError(f"GGML type {qtype!r} is not supported; allowed: {list(TYPES)}")
    w = w.detach().float().cpu()
    if w.dim() == 1:
        w = w.reshape(1, -1)
    r, k = w.shape
    if qtype == "f32":
        return w.contiguous().view(torch.uint8).reshape(r, 4 * k)
    if qtype == "f16":
        return w.to(torch.float16).contiguous().view(torch.uint8).reshape(r, 2 * k)
    if qtype == "bf16":
        return w.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(r, 2 * k)
    bs, size = BLOCK[qtype]
    if k % bs:
        raise ValueError(f"row length {k} is not a multiple of the {qtype} block size {bs}")
    return quantize_blocks(w.reshape(-1, bs), qtype).reshape(r, k // bs * size)


def fits(k: int, qtype: str) -> bool:
    """Whether rows of length ``k`` tile into ``qtype`` blocks."""
    return k % BLOCK[qtype][0] == 0


# signed integer range of the symmetric types, stored offset (x = d * (stored - offset))
_SYM = {"q4_0": (-8, 7), "q5_0": (-16, 15), "q8_0": (-128, 127)}
_AFFINE = {"q4_1": 15, "q5_1": 31}


def carry(qw, qtype: str) -> torch.Tensor | None:
    """Write a solved integer weight (:class:`~llmpress.quant.primitives.QuantizedWeight`, e.g.
    from GPTQ or AWQ) as ``qtype`` blocks keeping its integers, where its grid fits: integer
    weights with one scale per 32-column block (groups of a multiple of 32, or per channel) and
    ``q - zero`` within the type's range (a 4-bit grid fits Q4_0 when symmetric, Q5_0, Q8_0,
    Q4_1, Q5_1 in any case). Only the scales are rounded (to fp16). Returns bytes
    [R, K / 32 * size] or None where the grid does not fit."""
    s = qw.scheme
    if qtype not in _SYM and qtype not in _AFFINE:
        return None
    if s.type != "int" or s.group_axis != 1 or s.strategy not in ("group", "channel"):
        return None
    if qw.zero is not None and qw.zero.is_floating_point():
        return None  # HQQ's float zero points are not on an integer grid
    n, k = qw.shape
    gs = k if s.strategy == "channel" else s.group_size
    if k % QK or gs % QK:
        return None
    rep = gs // QK
    v = qw.qdata.to(torch.int32).cpu()
    if qw.zero is not None:
        v = v - qw.zero.to(torch.int32).cpu().reshape(n, -1).repeat_interleave(gs, 1)
    v = v.reshape(-1, QK)  # x = d * v per block
    d = qw.scale.float().cpu().reshape(n, -1).repeat_interleave(rep, 1).reshape(-1, 1)
    if not torch.isfinite(d.to(torch.float16)).all():
        return None
    if qtype in _SYM:
        lo, hi = _SYM[qtype]
        if v.min() < lo or v.max() > hi:
            return None
        return pack_block(qtype, d, v if qtype == "q8_0" else v - lo).reshape(n, -1)
    vmin = v.amin(-1, keepdim=True)
    if (v.amax(-1, keepdim=True) - vmin).max() > _AFFINE[qtype]:
        return None
    return pack_block(qtype, d, v - vmin, d * vmin).reshape(n, -1)
