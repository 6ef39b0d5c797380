"""Triton kernel for weight-only quantized matmuls (W2/W3/W4/W8 A16 and NF4/FP4): y = x Wᵀ + b
with W in :class:`~llmpress.kernels.layout.PackedWeight`'s layout, dequantized in registers.

One row (decode at batch 1) goes to a GEMV kernel (``_gemv_kernel``, below: CUDA cores, no
code-to-value table for integers); more rows to a tensor-core kernel for decode batches and prefill. Each of its programs computes a [BLOCK_M, BLOCK_N] tile of y over
a share of K: per step it reads BLOCK_K / per_word packed words per column (one coalesced row of
int32 across the tile's columns), unpacks them with shifts, applies the group's scale and zero
point (or looks the code up in the code book) and multiplies on the tensor cores (``tl.dot``;
rows past M are masked, so the weight is read once for all rows).

Decode shapes have too few column tiles to fill the GPU, so K is split over SPLIT_K programs.
In the tensor-core kernel each split stores its partial tile in its own slot of a float32
buffer; the last program to finish a tile (an arrival counter per tile) sums the slots in a
fixed order, adds the bias and writes y in the input dtype. The GEMV kernels (one row) add
their partial sums into a zeroed workspace atomically, and the last program reads the sum back
and leaves the workspace zeroed for the next call.
One launch per matmul: no zero-fill and no cast kernels around it. Configurations are
autotuned per (N, K, group, bits, M bucket).

Runs under ``TRITON_INTERPRET=1`` on the CPU too (slowly), which is how CI tests the kernel
itself against :func:`~llmpress.kernels.layout.reference_matmul`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llmpress.kernels.layout import PAD_K, PackedWeight

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the M = 1 kernel's packed-half path for 4-bit codes (inline PTX: never under the interpreter)
GEMV_F16X2 = os.environ.get("LLMPRESS_GEMV_F16X2", "1") != "0"

try:  # programmatic dependent launch (Hopper): Triton's griddepcontrol wrappers and launch option
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait

    _PDL_SUPPORTED = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
except ImportError:  # an older Triton: the kernels never take the PDL branch
    _PDL_SUPPORTED = False

    @triton.jit
    def _gdc_wait():
        pass

    @triton.jit
    def _gdc_launch_dependents():
        pass

# The K-major GEMV launched with programmatic dependent launch (LLMPRESS_PDL=1; compute
# capability 9.0+): it may start while the kernel before it finishes, requesting its (constant)
# weights before waiting for x. Off by default: on an H100 it did not speed up a chain of
# GEMVs and slowed the compiled W4 decode step by 5-9% (bench/results/gemv-kn-shipped.json,
# gpu-decode.json's ablation rows).
GEMV_PDL = os.environ.get("LLMPRESS_PDL", "0") == "1" and _PDL_SUPPORTED
# The K-major GEMV's guard against fp16 overflow in its packed-half sums: "xscale" (default: x
# scaled per step by a power of two that keeps every sum finite, from the x values each thread
# already holds) or "check" (a block-wide test of the sums, then the program's share again in
# float32 where one overflowed). The two measured the same within the run-to-run spread on an
# H100 (BENCHMARKS.md); xscale has no data-dependent slow path
KN_OVERFLOW = os.environ.get("LLMPRESS_KN_OVERFLOW", "xscale")
if KN_OVERFLOW not in ("xscale", "check"):
    raise ValueError(f"LLMPRESS_KN_OVERFLOW={KN_OVERFLOW!r}; allowed: xscale, check")


@triton.jit
def _codes_f32(u):
    """Small non-negative int32 codes as float32 without a (slow) int-to-float conversion: OR
    them into the mantissa of 2^23 and subtract 2^23 (exact below 2^23)."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _wa16_kernel(
    X, QW, S, Z, LUT, B, O, PW, CNT,
    M, N, K, GS,
    stride_xm, stride_om, stride_qn, stride_qk, stride_sn, stride_sg, m_bucket, code_mask,
    BITS: tl.constexpr, HAS_LUT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_w = tl.arange(0, BLOCK_K // PER)
    jpos = tl.arange(0, PER)
    shifts = jpos * BITS
    hshift = (jpos // (PER // 2)) * 16  # 0 for the low half-word's codes, 16 for the high half's
    jj = jpos % (PER // 2)
    in_place = code_mask << (jj * BITS)  # runtime masks: AND and OR fuse into one LOP3
    inv = tl.exp2(-(jj * BITS).to(tl.float32))  # 2^-(BITS * jj), exact
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        g = k0 // GS  # BLOCK_K divides the group: one scale row per step
        s = tl.load(S + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_LUT:  # words as [BLOCK_K / PER, BLOCK_N]: this orientation measured 5x faster for the gather
            p = tl.load(QW + offs_n[None, :] * stride_qn + (k0 // PER + offs_w)[:, None] * stride_qk,
                        mask=n_ok[None, :], other=0)
            u = (p[:, None, :] >> shifts[None, :, None]) & MASK  # [BLOCK_K / PER, PER, BLOCK_N]
            u = tl.reshape(u, (BLOCK_K, BLOCK_N))
            w = tl.load(LUT + u) * s[None, :]
        else:
            p = tl.load(QW + offs_n[:, None] * stride_qn + (k0 // PER + offs_w)[None, :] * stride_qk,
                        mask=n_ok[:, None], other=0)
            z = tl.load(Z + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
            # code j in place, OR-ed into the mantissa of 2^23: minus 2^23 it is u * 2^(BITS * jj);
            # one FFMA with s * 2^-(BITS * jj) and z * s gives (u - z) * s (as the GEMV kernel)
            v = ((p[:, :, None] >> hshift[None, None, :]) & in_place[None, None, :]) | 0x4B000000
            v = v.to(tl.float32, bitcast=True) - 8388608.0  # [BLOCK_N, BLOCK_K / PER, PER]
            w = v * (s[:, None] * inv[None, :])[:, None, :] - (z * s)[:, None, None]
            # (the [BLOCK_K / PER, PER, BLOCK_N] orientation compiles to the same SASS; the shared
            # memory store for the dot is still one 16-bit store per code, a layout Triton picks)
            w = tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)))
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    o_ptr = O + offs_m[:, None] * stride_om + offs_n[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=o_mask)
    else:
        # each K split stores its partial tile in its own slot (plain stores: atomic adds of
        # every split into one tile cost up to 4 us at M = 16); the last to arrive sums the
        # slots in a fixed order, so the result does not depend on which split finished first
        ws_ptr = offs_m[:, None] * N + offs_n[None, :]
        tl.store(PW + pid_k * M * N + ws_ptr, acc, mask=o_mask)
        tl.debug_barrier()  # every thread's partial sums are issued before the (one-thread) arrival below
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(CNT + tile, 1)  # acq_rel: the partial sums above are visible first
        if arrived == SPLIT_K - 1:  # the last program of this tile writes the result
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in tl.static_range(SPLIT_K):  # read at L2 (.cg), where the other splits' stores landed
                total += tl.load(PW + i * M * N + ws_ptr, mask=o_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(o_ptr, total.to(O.dtype.element_ty), mask=o_mask)
            tl.debug_barrier()
            tl.atomic_xchg(CNT + tile, 0)


@triton.jit
def _gemv_loads(qrow, S, Z, srow, k, rw, n_ok, KW, G, GS, PER: tl.constexpr, WPG: tl.constexpr, NG: tl.constexpr,
                HAS_LUT: tl.constexpr, EVEN: tl.constexpr):
    """One GEMV step's packed words [BLOCK_N, NG, WPG] from code k on, and its slices' scales
    and zero points [BLOCK_N, NG] (the scales stand in for the zero points of a code book).
    EVEN: the tile's columns all exist and every step lies inside K (no masks)."""
    wi = k // PER + rw
    kg = (k + tl.arange(0, NG) * (WPG * PER)) // GS  # group of each slice
    if EVEN:
        p = tl.load(qrow + wi[None, :, :])
        s = tl.load(S + srow + kg[None, :])
        z = s if HAS_LUT else tl.load(Z + srow + kg[None, :])
    else:
        p = tl.load(qrow + wi[None, :, :], mask=n_ok[:, None, None] & (wi < KW)[None, :, :], other=0)
        sm = n_ok[:, None] & (kg < G)[None, :]
        s = tl.load(S + srow + kg[None, :], mask=sm, other=0.0)
        z = s if HAS_LUT else tl.load(Z + srow + kg[None, :], mask=sm, other=0.0)
    return p, s, z


@triton.jit
def _x_at(X, kx, K, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(X + kx).to(tl.float32)
    return tl.load(X + kx, mask=kx < K, other=0.0).to(tl.float32)


# Two 4-bit words (16 codes) dotted with their x values in packed half precision (Marlin's
# conversion, arXiv:2408.11743): the codes at bits 0-3 / 16-19 of a word (of the word >> 8 for
# the next two) are masked and OR-ed into the mantissas of two fp16 1024s, giving 1024 + u; minus
# 1032 leaves u - 8 exactly. The codes at bits 4-7 / 20-23 are taken in place (1024 + 16 u;
# minus 1152 leaves 16 (u - 8)), their x pre-divided by 16. Centred codes keep the short fp16
# sum from cancelling against the zero point later. Eight HFMA2 against x pairs (x_j, x_{j+4})
# accumulate both words; the two halves are summed in fp32. 31 instructions per 16 codes,
# against ~52 for the FP32 path.
def _w4_word_f16x2(word: str, xa: str, xb: str, xc: str, xd: str) -> str:
    """PTX: one word's 8 codes to centred fp16 pairs, multiplied into ``acc`` against x pairs."""
    return f"""lop3.b32 a, {word}, 0x000f000f, 0x64006400, 0xea;
lop3.b32 b, {word}, 0x00f000f0, 0x64006400, 0xea;
shr.u32 t, {word}, 8;
lop3.b32 c, t, 0x000f000f, 0x64006400, 0xea;
lop3.b32 d, t, 0x00f000f0, 0x64006400, 0xea;
sub.f16x2 a, a, m0;
sub.f16x2 b, b, m1;
sub.f16x2 c, c, m0;
sub.f16x2 d, d, m1;
fma.rn.f16x2 acc, a, {xa}, acc;
fma.rn.f16x2 acc, b, {xb}, acc;
fma.rn.f16x2 acc, c, {xc}, acc;
fma.rn.f16x2 acc, d, {xd}, acc;
"""


_W4X2_DOT_F16X2 = tl.constexpr(
    "{\n.reg .b32 a, b, c, d, t, m0, m1, acc;\n.reg .b16 lo, hi;\n.reg .f32 f0, f1;\n"
    "mov.b32 m0, 0x64086408;\nmov.b32 m1, 0x64806480;\nmov.b32 acc, 0;\n"
    + _w4_word_f16x2("$1", "$3", "$4", "$5", "$6") + _w4_word_f16x2("$2", "$7", "$8", "$9", "$10")
    + "mov.b32 {lo, hi}, acc;\ncvt.f32.f16 f0, lo;\ncvt.f32.f16 f1, hi;\nadd.f32 $0, f0, f1;\n}")


@triton.jit
def _f16x2(hi, lo):
    """Two float32 tensors as one int32 tensor of fp16 pairs (lo in the low half)."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f", [hi, lo], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _x8(X, kb, K, EVEN: tl.constexpr):
    """The 8 x values of one word from kb on, float32."""
    return (_x_at(X, kb, K, EVEN), _x_at(X, kb + 1, K, EVEN), _x_at(X, kb + 2, K, EVEN), _x_at(X, kb + 3, K, EVEN),
            _x_at(X, kb + 4, K, EVEN), _x_at(X, kb + 5, K, EVEN), _x_at(X, kb + 6, K, EVEN), _x_at(X, kb + 7, K, EVEN))


@triton.jit
def _absmax8(x0, x1, x2, x3, x4, x5, x6, x7):
    return tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                      tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))))


@triton.jit
def _pairs8(x0, x1, x2, x3, x4, x5, x6, x7, c):
    """One word's 8 x values times c as the four fp16 pairs ``_W4X2_DOT_F16X2`` takes (the
    in-place positions divided by 16 more), and their float32 sum."""
    xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    c16 = c * 0.0625
    return _f16x2(x4 * c, x0 * c), _f16x2(x5 * c16, x1 * c16), _f16x2(x6 * c, x2 * c), _f16x2(x7 * c16, x3 * c16), xs


@triton.jit
def _x_pairs(X, kb, K, c, EVEN: tl.constexpr):
    """``_pairs8`` of the word's x values loaded from kb on."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _x8(X, kb, K, EVEN)
    return _pairs8(x0, x1, x2, x3, x4, x5, x6, x7, c)


@triton.jit
def _int_step_f16x2(p, s, z, X, k0, kw, K, EVEN: tl.constexpr):
    """``_int_step`` for 4-bit codes through ``_W4X2_DOT_F16X2``, one result per pair of words
    [BLOCK_N, NG, WPG / 2]: s / c * sum_j (u_j - 8) x_j c - s (z - 8) sum_j x_j. x is scaled by
    c = 1/4 before it becomes fp16 (8 products per half-sum stay finite for |x| below ~8000;
    |x| down to ~4e-3 stays a normal fp16 number at the in-place positions)."""
    BN: tl.constexpr = p.shape[0]
    NG: tl.constexpr = p.shape[1]
    WPG: tl.constexpr = p.shape[2]
    pe, po = tl.split(tl.reshape(p, (BN, NG, WPG // 2, 2)))
    kq, _ = tl.split(tl.reshape(kw, (NG, WPG // 2, 2)))  # first k of each pair of words
    c = 0.25
    a0, b0, c0, d0, xs0 = _x_pairs(X, k0 + kq, K, c, EVEN)
    a1, b1, c1, d1, xs1 = _x_pairs(X, k0 + kq + 8, K, c, EVEN)
    shape: tl.constexpr = pe.shape
    t = tl.inline_asm_elementwise(
        _W4X2_DOT_F16X2, "=f,r,r,r,r,r,r,r,r,r,r",
        [pe, po, tl.broadcast_to(a0[None, :, :], shape), tl.broadcast_to(b0[None, :, :], shape),
         tl.broadcast_to(c0[None, :, :], shape), tl.broadcast_to(d0[None, :, :], shape),
         tl.broadcast_to(a1[None, :, :], shape), tl.broadcast_to(b1[None, :, :], shape),
         tl.broadcast_to(c1[None, :, :], shape), tl.broadcast_to(d1[None, :, :], shape)],
        dtype=tl.float32, is_pure=True, pack=1)
    return t * (s * 4.0)[:, :, None] - ((z - 8.0) * s)[:, :, None] * (xs0 + xs1)[None, :, :]


@triton.jit
def _int_step(p, s, z, X, k0, kw, K, code_mask, BITS: tl.constexpr, EVEN: tl.constexpr):
    """One GEMV step of integer codes: the words p [BLOCK_N, NG, WPG] times x from k0, scaled per
    slice, s * (sum_j u_j x_j - z * sum_j x_j). Code j of the low half-word (of p >> 16 for the
    high half) is masked in place and OR-ed into the mantissa of 2^23, giving
    2^23 + u * 2^(BITS * jj) exactly, so u * x = (that - 2^23) * (x / 2^(BITS * jj))."""
    PER: tl.constexpr = 32 // BITS
    t = tl.zeros(p.shape, dtype=tl.float32)
    xs = tl.zeros(kw.shape, dtype=tl.float32)  # sum of x over each word's codes
    hi = p >> 16
    for j in tl.static_range(PER):
        xj = _x_at(X, k0 + kw + j, K, EVEN)  # [NG, WPG]
        xs += xj
        jj = j % (PER // 2)
        src = p if j < PER // 2 else hi
        v = ((src & (code_mask << (jj * BITS))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        t += v * (xj * (1.0 / (1 << (jj * BITS))))[None, :, :]
    return (t - z[:, :, None] * xs[None, :, :]) * s[:, :, None]


@triton.jit
def _store_row(acc, offs_n, n_ok, B, O, WS, CNT, pid_n, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write one row of y: directly, or (split K) add this program's partial sums to the float32
    workspace; the last program of the column tile (arrival counter) writes the total, adds the
    bias and leaves the workspace and counter zeroed for the next call."""
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(O + offs_n, acc.to(O.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(WS + offs_n, acc, mask=n_ok)
        tl.debug_barrier()  # every thread's partial sums are issued before the (one-thread) arrival below
        arrived = tl.atomic_add(CNT + pid_n, 1)  # acq_rel at GPU scope: releases them to the last program
        if arrived == SPLIT_K - 1:
            zero = tl.zeros(acc.shape, dtype=tl.float32)
            total = tl.atomic_add(WS + offs_n, zero, mask=n_ok)  # read at L2, where the atomics landed
            tl.store(WS + offs_n, zero, mask=n_ok)
            if HAS_BIAS:
                total += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(O + offs_n, total.to(O.dtype.element_ty), mask=n_ok)
            tl.debug_barrier()
            tl.atomic_xchg(CNT + pid_n, 0)


@triton.jit
def _nonfinite(acc):
    """Whether any of the program's sums is NaN or infinite (an fp16 sum overflowed)."""
    return tl.max(((acc != acc) | (tl.abs(acc) == float("inf"))).to(tl.int32), axis=0) > 0


@triton.jit
def _gemv_sum(X, LUT, qrow, S, Z, srow, rw, kw, n_ok, K, KW, G, GS, k_first, code_mask,
              BITS: tl.constexpr, HAS_LUT: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, WPG: tl.constexpr,
              STEP: tl.constexpr, PREFETCH: tl.constexpr, EVEN: tl.constexpr, HALF: tl.constexpr):
    """The GEMV's loop over this program's steps: y's partial sums for its BLOCK_N columns."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    acc = tl.zeros((BLOCK_N, NG, WPG), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, NG, WPG // 2 if HALF else 1), dtype=tl.float32)
    p_nx, s_nx, z_nx = _gemv_loads(qrow, S, Z, srow, k_first, rw, n_ok, KW, G, GS, PER, WPG, NG, HAS_LUT, EVEN)
    for k0 in range(k_first, K, STEP):
        # the step after this one; the last step re-reads itself (no load past the end without masks)
        k_nx = tl.where(k0 + STEP < K, k0 + STEP, k0) if EVEN else k0 + STEP
        p = p_nx
        s = s_nx.to(tl.float32)
        z = z_nx.to(tl.float32)
        if PREFETCH:
            p_nx, s_nx, z_nx = _gemv_loads(qrow, S, Z, srow, k_nx, rw, n_ok, KW, G, GS, PER, WPG, NG, HAS_LUT, EVEN)
        if HAS_LUT:
            t = tl.zeros((BLOCK_N, NG, WPG), dtype=tl.float32)
            for j in tl.static_range(PER):
                xj = _x_at(X, k0 + kw + j, K, EVEN)  # [NG, WPG]
                t += tl.load(LUT + ((p >> (j * BITS)) & MASK)) * xj[None, :, :]
            acc += t * s[:, :, None]
        elif HALF:
            acc2 += _int_step_f16x2(p, s, z, X, k0, kw, K, EVEN)
        else:
            acc += _int_step(p, s, z, X, k0, kw, K, code_mask, BITS, EVEN)
        if not PREFETCH:
            p_nx, s_nx, z_nx = _gemv_loads(qrow, S, Z, srow, k_nx, rw, n_ok, KW, G, GS, PER, WPG, NG, HAS_LUT, EVEN)
    if HALF:
        return tl.sum(tl.sum(acc2, axis=2), axis=1)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _gemv_kernel(
    X, QW, S, Z, LUT, B, O, WS, CNT,
    N, K, KW, G, GS,
    stride_qn, stride_sn, code_mask,
    BITS: tl.constexpr, HAS_LUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, NG: tl.constexpr, WPG: tl.constexpr, SPLIT_K: tl.constexpr,
    PREFETCH: tl.constexpr, EVEN: tl.constexpr, F16X2: tl.constexpr = False,
):
    """M = 1 (decode), without reshapes: a step loads a [BLOCK_N, NG, WPG] tile of packed words
    (each column's words are contiguous along K: 16-byte vector loads; NG slices of WPG words,
    each slice inside one group). For each of the PER code positions j of a word it multiplies
    the codes at j by x[k + j] (a strided load of x, from L1).

    Integer codes become floats without a shift or an int-to-float conversion (which runs at a
    quarter of the FMA rate): code j of the low half-word (of the word shifted by 16 for the
    high half) is masked in place and OR-ed into the mantissa of 2^23, giving
    2^23 + u * 2^(BITS * j) exactly; minus 2^23, times x / 2^(BITS * j) (exact: a power of
    two), it adds u * x. One code costs a LOP3 (the mask is a runtime value so that mask and OR
    fuse into one), an FADD and an FFMA. The zero point is kept apart, exact even when it is a
    float (HQQ): per word, s * (sum_j u_j x_j - z * sum_j x_j). The reduction over the tile
    runs once at the end. With PREFETCH the next step's words and group parameters load while
    this step computes; EVEN (whole tiles and steps) drops every mask.

    F16X2 (4-bit codes, 16-bit x, on a GPU): two codes per instruction in packed half precision
    instead (``_W4X2_DOT_F16X2``, ~2.5 instead of ~4.5 instructions per code); a program whose
    fp16 sums overflowed redoes its share in float32."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = NG * WPG * PER
    STEP: tl.constexpr = SPLIT_K * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rw = tl.arange(0, NG)[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [NG, WPG] words of a step
    kw = rw * PER  # k of each word's first code
    qrow = QW + offs_n[:, None, None] * stride_qn
    srow = offs_n[:, None] * stride_sn
    HALF: tl.constexpr = F16X2 and BITS == 4 and not HAS_LUT and WPG >= 2
    acc1 = _gemv_sum(X, LUT, qrow, S, Z, srow, rw, kw, n_ok, K, KW, G, GS, pid_k * BLOCK_K, code_mask, BITS, HAS_LUT,
                     BLOCK_N, NG, WPG, STEP, PREFETCH, EVEN, HALF)
    if HALF:  # an fp16 sum overflowed (|x| in the thousands): this program's share again in float32
        if _nonfinite(acc1):
            acc1 = _gemv_sum(X, LUT, qrow, S, Z, srow, rw, kw, n_ok, K, KW, G, GS, pid_k * BLOCK_K, code_mask, BITS,
                             HAS_LUT, BLOCK_N, NG, WPG, STEP, PREFETCH, EVEN, False)
    _store_row(acc1, offs_n, n_ok, B, O, WS, CNT, pid_n, SPLIT_K, HAS_BIAS)


@triton.jit
def _kn_loads(QT, ST, ZT, offs_n, n_ok, w0, N, G, GS, stride_sg, BW: tl.constexpr, HALF: tl.constexpr,
              EVEN: tl.constexpr):
    """One step's words (even and odd word rows for the packed-half path), scales and zero points."""
    g = tl.minimum(w0 * 8 // GS, G - 1)  # (steps in K's zero padding read the last group: x is 0 there)
    if EVEN:
        s = tl.load(ST + g * stride_sg + offs_n)
        z = tl.load(ZT + g * stride_sg + offs_n)
    else:
        s = tl.load(ST + g * stride_sg + offs_n, mask=n_ok, other=0.0)
        z = tl.load(ZT + g * stride_sg + offs_n, mask=n_ok, other=0.0)
    if HALF:
        ri = tl.arange(0, BW // 2)
        pe_ptr = QT + (w0 + 2 * ri)[:, None] * N + offs_n[None, :]
        if EVEN:
            pe = tl.load(pe_ptr)
            po = tl.load(pe_ptr + N)
        else:
            pe = tl.load(pe_ptr, mask=n_ok[None, :], other=0)
            po = tl.load(pe_ptr + N, mask=n_ok[None, :], other=0)
    else:
        ri = tl.arange(0, BW)
        p_ptr = QT + (w0 + ri)[:, None] * N + offs_n[None, :]
        if EVEN:
            pe = tl.load(p_ptr)
        else:
            pe = tl.load(p_ptr, mask=n_ok[None, :], other=0)
        po = pe
    return pe, po, s, z


@triton.jit
def _kn_sum(X, QT, ST, ZT, offs_n, n_ok, pid_k, N, K, G, GS, stride_sg,
            BW: tl.constexpr, STEPS: tl.constexpr, HALF: tl.constexpr, EVEN: tl.constexpr,
            XSCALE: tl.constexpr = False, PDL: tl.constexpr = False):
    """``_gemv_kn_kernel``'s partial sums [BLOCK_N] over its STEPS steps of BW word rows.
    XSCALE (packed half): x is scaled per step by a power of two that keeps every fp16 sum
    finite (64 |x| c <= 2^14 for the step's largest |x|) instead of the fixed c = 1/4.
    PDL: the first step's weights are requested before waiting for the previous kernel
    (programmatic dependent launch); x and every write come after the wait."""
    acc = tl.zeros(offs_n.shape, dtype=tl.float32)
    w_first = pid_k * STEPS * BW
    pe0, po0, s0, z0 = _kn_loads(QT, ST, ZT, offs_n, n_ok, w_first, N, G, GS, stride_sg, BW, HALF, EVEN)
    if PDL:
        _gdc_wait()
        _gdc_launch_dependents()
    for st in tl.static_range(STEPS):
        w0 = w_first + st * BW  # the step's first word row
        k0 = w0 * 8
        if st == 0:
            pe, po, s, z = pe0, po0, s0, z0
        else:
            pe, po, s, z = _kn_loads(QT, ST, ZT, offs_n, n_ok, w0, N, G, GS, stride_sg, BW, HALF, EVEN)
        s = s.to(tl.float32)
        z = z.to(tl.float32)
        if HALF:
            ri = tl.arange(0, BW // 2)
            kb = (k0 + 16 * ri)[:, None]
            x0, x1, x2, x3, x4, x5, x6, x7 = _x8(X, kb, K, EVEN)
            y0, y1, y2, y3, y4, y5, y6, y7 = _x8(X, kb + 8, K, EVEN)
            if XSCALE:  # the step's largest |x|: every thread holds the step's x, so no exchange between threads
                xm = tl.max(tl.maximum(_absmax8(x0, x1, x2, x3, x4, x5, x6, x7),
                                       _absmax8(y0, y1, y2, y3, y4, y5, y6, y7)), axis=0)
                c = tl.minimum(tl.exp2(tl.floor(tl.log2(256.0 / tl.maximum(xm, 1e-30)))), 0.25)
            else:
                c = 0.25
            a0, b0, c0, d0, xs0 = _pairs8(x0, x1, x2, x3, x4, x5, x6, x7, c)
            a1, b1, c1, d1, xs1 = _pairs8(y0, y1, y2, y3, y4, y5, y6, y7, c)
            t = tl.inline_asm_elementwise(
                _W4X2_DOT_F16X2, "=f,r,r,r,r,r,r,r,r,r,r",
                [pe, po, tl.broadcast_to(a0, pe.shape), tl.broadcast_to(b0, pe.shape), tl.broadcast_to(c0, pe.shape),
                 tl.broadcast_to(d0, pe.shape), tl.broadcast_to(a1, pe.shape), tl.broadcast_to(b1, pe.shape),
                 tl.broadcast_to(c1, pe.shape), tl.broadcast_to(d1, pe.shape)],
                dtype=tl.float32, is_pure=True, pack=1)
            xs = tl.sum(xs0 + xs1, axis=0)  # [1]
            acc += tl.sum(t, axis=0) * (s / c) - (z - 8.0) * s * xs
        else:
            ri = tl.arange(0, BW)
            p = pe
            t = tl.zeros(p.shape, dtype=tl.float32)
            xs = tl.zeros((BW, 1), dtype=tl.float32)
            hi = p >> 16
            for j in tl.static_range(8):  # code j masked in place, OR-ed into 2^23 (as _int_step)
                xj = _x_at(X, (k0 + 8 * ri + j)[:, None], K, EVEN)
                xs += xj
                jj = j % 4
                src = p if j < 4 else hi
                v = ((src & (15 << (jj * 4))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                t += v * (xj * (1.0 / (1 << (jj * 4))))
            acc += tl.sum(t, axis=0) * s - z * s * tl.sum(xs, axis=0)
    return acc


@triton.jit
def _gemv_kn_kernel(X, QT, ST, ZT, B, O, WS, CNT, N, K, G, GS, stride_sg,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BW: tl.constexpr, STEPS: tl.constexpr,
                    SPLIT: tl.constexpr, EVEN: tl.constexpr, F16X2: tl.constexpr = False,
                    CHECK: tl.constexpr = True, XSCALE: tl.constexpr = False, PDL: tl.constexpr = False):
    """M = 1 over the K-major layout (4-bit integer codes; words [Kp / 8, N], scales and zero
    points [G, N]): program (pid_n, pid_k) reads STEPS steps of BW word rows, each row one
    coalesced line across its BLOCK_N columns, with no loop over K; the SPLIT = Kp / (8 BW STEPS)
    partial sums of a column tile meet in the zeroed workspace (``_store_row``). Many small
    programs keep more loads in flight than a loop per column tile: 59-61% of the copy ceiling
    on the large decode shapes of an H100 against 40-42% for ``_gemv_kernel`` in the probe
    (``bench/gemv_kn_probe.py``). A step lies inside one group; its x values are shared by
    every column of the tile. Codes as in ``_gemv_kernel``: packed half precision on the GPU
    (F16X2, with an fp16-overflow guard), float32 otherwise.
    EVEN: whole column tiles and K a multiple of the packing's padding (no masks). XSCALE (the
    default guard, KN_OVERFLOW) scales x per step so that no fp16 sum can overflow, instead of
    the CHECK redo; CHECK=False without XSCALE has no guard (measurement only:
    bench/gemv_kn_probe.py --shipped). PDL: programmatic dependent launch (GEMV_PDL)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    HALF: tl.constexpr = F16X2 and BW >= 2
    acc = _kn_sum(X, QT, ST, ZT, offs_n, n_ok, pid_k, N, K, G, GS, stride_sg, BW, STEPS, HALF, EVEN, XSCALE, PDL)
    if HALF and CHECK and not XSCALE:  # an fp16 sum overflowed (|x| in the thousands): this program's share again in float32
        if _nonfinite(acc):
            acc = _kn_sum(X, QT, ST, ZT, offs_n, n_ok, pid_k, N, K, G, GS, stride_sg, BW, STEPS, False, EVEN)
    _store_row(acc, offs_n, n_ok, B, O, WS, CNT, pid_n, SPLIT, HAS_BIAS)


@triton.jit
def _gemv_lut_kernel(
    X, QW, S, Z, LUT, B, O, WS, CNT,
    N, K, GS,
    stride_qn, stride_sn,
    BITS: tl.constexpr, HAS_LUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GSB: tl.constexpr, SPLIT_K: tl.constexpr,
    DEFER: tl.constexpr = False,
):
    """M = 1 for code books (NF4 / FP4; integer codes take ``_gemv_kernel``, which measured
    faster for them and slower for a table lookup): each column's words are contiguous along K,
    so a thread reads vectors of one column and reduces in-thread. The step's BLOCK_K codes split into NG = BLOCK_K / GSB slices
    of one group each; integer codes are summed against x first and scaled once per slice:
    s * (Σ x·u − z · Σ x). With DEFER the scaled products accumulate element-wise and are
    reduced once at the end instead (no cross-thread reduction per step); the autotuner picks."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = BLOCK_K // GSB
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_w = tl.arange(0, BLOCK_K // PER)
    shifts = tl.arange(0, PER) * BITS
    offs_g = tl.arange(0, NG)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, NG, GSB), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        p = tl.load(QW + offs_n[:, None] * stride_qn + (k0 // PER + offs_w)[None, :], mask=n_ok[:, None], other=0)
        u = (p[:, :, None] >> shifts[None, None, :]) & MASK  # [BLOCK_N, BLOCK_K / PER, PER]
        u = tl.reshape(u, (BLOCK_N, NG, GSB))
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.reshape(tl.load(X + offs_k, mask=offs_k < K, other=0.0).to(tl.float32), (NG, GSB))
        kg = k0 + offs_g * GSB  # first k of each slice
        sm = n_ok[:, None] & (kg[None, :] < K)
        s = tl.load(S + offs_n[:, None] * stride_sn + (kg // GS)[None, :], mask=sm, other=0.0).to(tl.float32)
        # codes to values through a table: the code book, or 0..2^bits-1 for integers (measured
        # 2x faster on an H100 than converting the integers arithmetically here)
        vals = tl.load(LUT + u)
        if DEFER:
            if HAS_LUT:
                acc2 += vals * s[:, :, None] * x[None, :, :]
            else:
                z = tl.load(Z + offs_n[:, None] * stride_sn + (kg // GS)[None, :], mask=sm, other=0.0).to(tl.float32)
                acc2 += (vals - z[:, :, None]) * s[:, :, None] * x[None, :, :]
        else:
            part = tl.sum(vals * x[None, :, :], axis=2)  # [BLOCK_N, NG]
            if HAS_LUT:
                acc += tl.sum(s * part, axis=1)
            else:
                z = tl.load(Z + offs_n[:, None] * stride_sn + (kg // GS)[None, :], mask=sm, other=0.0).to(tl.float32)
                xs = tl.sum(x, axis=1)
                acc += tl.sum(s * (part - z * xs[None, :]), axis=1)
    if DEFER:
        acc += tl.sum(tl.sum(acc2, axis=2), axis=1)
    _store_row(acc, offs_n, n_ok, B, O, WS, CNT, pid_n, SPLIT_K, HAS_BIAS)


@triton.jit
def _dequant_kernel(
    QW, S, Z, LUT, W, N, K, GS, stride_qn, stride_qk, stride_sn, stride_sg,
    BITS: tl.constexpr, HAS_LUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ONE_GROUP: tl.constexpr = False,
):
    """W [N, K] in the output dtype from the packed layout (prefill: then one cuBLAS matmul).
    ONE_GROUP: the tile's BLOCK_K codes lie in one group, so each row loads one scale and zero
    point instead of one per element."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_w = tl.arange(0, BLOCK_K // PER)
    shifts = tl.arange(0, PER) * BITS
    n_ok = offs_n < N
    p = tl.load(QW + offs_n[:, None] * stride_qn + (k0 // PER + offs_w)[None, :] * stride_qk, mask=n_ok[:, None],
                other=0)
    u = tl.reshape((p[:, :, None] >> shifts[None, None, :]) & MASK, (BLOCK_N, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ok = n_ok[:, None] & (offs_k[None, :] < K)
    if ONE_GROUP:  # [BLOCK_N, 1]: one scale / zero point per row, broadcast over the tile
        goff = (offs_n * stride_sn + (k0 // GS) * stride_sg)[:, None]
        gm = n_ok[:, None]
    else:  # [BLOCK_N, BLOCK_K]: one per element
        goff = offs_n[:, None] * stride_sn + (offs_k // GS)[None, :] * stride_sg
        gm = ok
    s = tl.load(S + goff, mask=gm, other=0.0).to(tl.float32)
    if HAS_LUT:
        w = tl.load(LUT + u) * s
    else:
        z = tl.load(Z + goff, mask=gm, other=0.0).to(tl.float32)
        w = (_codes_f32(u) - z) * s
    tl.store(W + offs_n[:, None] * K + offs_k[None, :], w.to(W.dtype.element_ty), mask=ok)


def dequantize(p: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in ``dtype`` (one kernel; prefill multiplies it with cuBLAS)."""
    w = torch.empty(p.n, p.k, device=p.qw.device, dtype=dtype)
    zero = p.zero if p.zero is not None else p.scale
    lut = p.lut if p.lut is not None else p.scale
    bn, bk = 32, 128
    grid = (triton.cdiv(p.n, bn), triton.cdiv(p.k, bk))
    _dequant_kernel[grid](p.qw, p.scale, zero, lut, w, p.n, p.k, p.group_size, *p.qw_nk.stride(), *p.scale_ng.stride(),
                          BITS=p.bits, HAS_LUT=p.lut is not None, BLOCK_N=bn, BLOCK_K=bk,
                          ONE_GROUP=p.group_size >= p.k or p.group_size % bk == 0, num_warps=4)
    return w


# rows from which dequantize-then-cuBLAS beats the fused kernel (H100 measurement: the fused
# kernel falls behind bf16 cuBLAS past M = 16 and to 0.2x at M = 512)
PREFILL_M = 64


# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages): split K for decode shapes, wide tiles
# without split for prefill; BLOCK_K is cut to the group size where the group is smaller.
_CONFIGS = [
    (64, 128, 1, 4, 3), (64, 128, 4, 4, 3), (64, 128, 8, 4, 3), (128, 128, 1, 4, 3), (128, 128, 2, 4, 3),
    (128, 128, 4, 4, 4), (256, 64, 1, 8, 3), (32, 128, 8, 4, 3), (64, 64, 16, 4, 4), (128, 64, 8, 4, 4),
    # the best of an 80-configuration sweep at M = 2, 8, 16 (bench/gemv_probe.py --tc, H100, W4 g128)
    (128, 64, 16, 4, 2), (128, 64, 16, 4, 4), (128, 128, 8, 4, 4), (128, 128, 2, 4, 4), (64, 64, 8, 4, 4),
]


def _bk_cap(gs: int, k: int) -> int:
    return 128 if gs >= k else max(d for d in (16, 32, 64, 128) if gs % d == 0)


def _prune(configs, named_args, **kwargs):
    cap = _bk_cap(named_args["GS"], named_args["K"])
    per = 32 // kwargs.get("BITS", named_args.get("BITS", 4))
    seen, out = set(), []
    for c in configs:
        if not _split_fits(c.kwargs["SPLIT_K"], named_args["m_bucket"], named_args["N"]):
            continue
        bk = min(c.kwargs["BLOCK_K"], cap)
        key = (c.kwargs["BLOCK_N"], bk, c.kwargs["SPLIT_K"], c.num_warps, c.num_stages)
        if bk >= 2 * per and key not in seen:
            seen.add(key)
            out.append(triton.Config({"BLOCK_N": key[0], "BLOCK_K": bk, "SPLIT_K": key[2]},
                                     num_warps=key[3], num_stages=key[4]))
    return out


_AUTOTUNE = dict(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w, num_stages=st)
             for n, k, s, w, st in _CONFIGS],
    key=["N", "K", "GS", "BITS", "HAS_LUT", "BLOCK_M", "m_bucket"],  # m_bucket: tuned per power-of-two M
    prune_configs_by={"early_config_prune": _prune},
)
def _autotune(spec: dict, kernel):
    """``triton.autotune(**spec)`` with short trials (decode kernels run for microseconds),
    or Triton's default trials where it lacks those arguments."""
    try:
        return triton.autotune(**spec, warmup=5, rep=20)(kernel)
    except TypeError:
        return triton.autotune(**spec)(kernel)


_tuned = _autotune(_AUTOTUNE, _wa16_kernel)

# GEMV (M = 1): (BLOCK_N, words per step, SPLIT_K, num_warps, prefetch) — the fastest of two
# sweeps on an H100 at 4096x4096, 14336x4096 and 4096x14336, W4 g128 and W8 per channel
# (bench/gemv_probe.py --wide: 60 configurations, then 78 with 8-column tiles, run on an
# interleaved-layout variant of this kernel that measured the same and was not kept), plus two
# split-K ones for narrow layers (few column tiles); a step's words split into slices of at most
# 16 words inside one group.
_GEMV_CONFIGS = [
    (8, 128, 1, 8, True), (16, 128, 1, 4, True), (16, 128, 1, 8, True), (16, 64, 1, 4, True), (16, 128, 2, 4, True),
    (32, 128, 2, 4, True), (32, 64, 1, 4, True), (64, 32, 4, 8, True), (16, 64, 4, 4, True), (32, 32, 8, 4, True),
    # wider tiles, for the packed-half path only (64 words per thread): it shares each x pair
    # across more columns (2.55 instructions per code at 64 x 128 words against 2.89 at 32 x 128,
    # counted in SASS); the float32 path spills there (W8 per channel on 14336x4096 measured
    # 47 us instead of 33 us when the autotuner could pick them)
    (64, 128, 2, 4, True), (64, 128, 4, 4, True), (32, 128, 4, 4, True),
]


def _slices(bits: int, group_size: int, k: int, words: int) -> tuple[int, int] | None:
    """(NG, WPG) for a step of ``words`` words: slices of WPG <= 16 words (WPG * codes per word
    must divide the group), NG = words / WPG; None if no slice width fits."""
    per = 32 // bits
    if group_size >= k:
        wpg = min(16, words)
    else:
        if group_size % per:
            return None
        gw = group_size // per
        wpg = max((d for d in (16, 8, 4, 2, 1) if d <= words and gw % d == 0), default=None)
        if wpg is None:
            return None
    return (words // wpg, wpg) if words % wpg == 0 else None


def _prune_gemv(configs, named_args, **kwargs):
    bits = kwargs.get("BITS", named_args.get("BITS", 4))
    half = kwargs.get("F16X2", False) and bits == 4 and not kwargs.get("HAS_LUT", False)
    out = []
    for c in configs:
        if c.kwargs["BLOCK_N"] * c.kwargs["WORDS"] > 32 * 32 * c.num_warps and not half:
            continue  # more than 32 words per thread spills the float32 path's registers
        sl = _slices(bits, named_args["GS"], named_args["K"], c.kwargs["WORDS"])
        if sl is not None:
            kw = {k: v for k, v in c.kwargs.items() if k != "WORDS"}
            out.append(triton.Config({**kw, "NG": sl[0], "WPG": sl[1]}, num_warps=c.num_warps, num_stages=1))
    return out


def _even(a: dict) -> bool:
    """No masks needed: whole column tiles, whole steps, and a first step for every K split."""
    bk = a["NG"] * a["WPG"] * (32 // a["BITS"])
    return a["N"] % a["BLOCK_N"] == 0 and a["K"] % bk == 0 and a["K"] >= a["SPLIT_K"] * bk


_gemv_even = triton.heuristics({"EVEN": _even})(_gemv_kernel)

_GEMV_AUTOTUNE = dict(
    configs=[triton.Config({"BLOCK_N": n, "WORDS": w, "SPLIT_K": s, "PREFETCH": pf}, num_warps=wp, num_stages=1)
             for n, w, s, wp, pf in _GEMV_CONFIGS],
    key=["N", "K", "GS", "BITS", "HAS_LUT"],
    prune_configs_by={"early_config_prune": _prune_gemv},
)
_gemv_tuned = _autotune(_GEMV_AUTOTUNE, _gemv_even)


# K-major GEMV (M = 1, 4-bit integer codes): (BLOCK_N, BW word rows per step, STEPS, num_warps) —
# the best five per shape of a 44-configuration sweep on an H100 (bench/gemv_kn_probe.py, W4 g128
# at 4096x4096, 14336x4096 and 4096x14336: 512 x 16 x 1 x 4 fastest on the large two), plus
# narrower tiles for narrow layers (k / v projections: enough programs to fill the GPU) and
# for groups of 32 / 64 (a step stays inside one group)
_KN_CONFIGS = [
    (512, 16, 1, 4), (512, 8, 2, 4), (1024, 16, 1, 8), (256, 16, 2, 4), (512, 8, 1, 4), (1024, 8, 1, 8),
    (256, 8, 1, 4), (256, 16, 1, 4), (128, 16, 1, 4), (128, 8, 2, 4), (512, 4, 4, 4), (256, 4, 4, 4),
    (128, 8, 1, 4),
]


def _kn_fits(bw: int, steps: int, group_size: int, k: int, kw: int) -> bool:
    """A step of ``bw`` word rows inside one group, and the packed K split into whole programs."""
    return (group_size >= k or group_size % (8 * bw) == 0) and kw % (bw * steps) == 0


def _kn_word_rows(k: int) -> int:
    """Rows of 4-bit words in the packed K (padded to PAD_K)."""
    return -(-k // PAD_K) * PAD_K // 8


def _prune_kn(configs, named_args, **kwargs):
    gs, k, n = named_args["GS"], named_args["K"], named_args["N"]
    kw = _kn_word_rows(k)
    out = [c for c in configs if _kn_fits(c.kwargs["BW"], c.kwargs["STEPS"], gs, k, kw)]
    wide = [c for c in out if c.kwargs["BLOCK_N"] <= max(128, triton.next_power_of_2(n))]
    return wide or out


def _kn_heuristics(a: dict) -> dict:
    return {"SPLIT": _kn_word_rows(a["K"]) // (a["BW"] * a["STEPS"]), "EVEN": a["N"] % a["BLOCK_N"] == 0 and a["K"] % PAD_K == 0}


_gemv_kn = triton.heuristics({"SPLIT": lambda a: _kn_heuristics(a)["SPLIT"],
                              "EVEN": lambda a: _kn_heuristics(a)["EVEN"]})(_gemv_kn_kernel)
_KN_AUTOTUNE = dict(
    configs=[triton.Config({"BLOCK_N": n, "BW": bw, "STEPS": st}, num_warps=w, num_stages=1)
             for n, bw, st, w in _KN_CONFIGS],
    key=["N", "K", "GS"],
    prune_configs_by={"early_config_prune": _prune_kn},
)
_gemv_kn_tuned = _autotune(_KN_AUTOTUNE, _gemv_kn)


def gemv_ok(bits: int, group_size: int, k: int) -> bool:
    return _slices(bits, group_size, k, 64) is not None


# code-book GEMV (M = 1): (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
_LUT_CONFIGS = [
    (32, 256, 1, 4, 3), (32, 256, 4, 4, 3), (64, 256, 2, 4, 3), (16, 512, 2, 4, 3), (32, 512, 2, 8, 3),
    (16, 256, 4, 4, 3), (64, 128, 4, 4, 3), (32, 128, 8, 4, 3),
]
_LUT_DEFER = [(32, 256, 2, 4, 3), (16, 256, 4, 4, 3), (32, 128, 4, 4, 3), (64, 128, 2, 8, 3), (16, 512, 2, 8, 3)]


def _gsb(gs: int, k: int, bk: int) -> int | None:
    """Slice length for a GEMV step of ``bk``: the step inside one group, or whole groups."""
    if gs >= k or gs % bk == 0:
        return bk
    return gs if bk % gs == 0 else None


def _prune_lut(configs, named_args, **kwargs):
    gs, k = named_args["GS"], named_args["K"]
    out = []
    for c in configs:
        g = _gsb(gs, k, c.kwargs["BLOCK_K"])
        if g is not None:
            out.append(triton.Config({**c.kwargs, "GSB": g}, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


_LUT_AUTOTUNE = dict(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w, num_stages=st)
             for n, k, s, w, st in _LUT_CONFIGS]
    + [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s, "DEFER": True}, num_warps=w, num_stages=st)
       for n, k, s, w, st in _LUT_DEFER],
    key=["N", "K", "GS"],
    prune_configs_by={"early_config_prune": _prune_lut},
)
_lut_tuned = _autotune(_LUT_AUTOTUNE, _gemv_lut_kernel)


_PARTIALS: dict = {}
PARTIALS_CAP = 1 << 24  # float32 elements (64 MB) for the tensor-core kernel's split-K partial tiles


def _split_fits(split_k: int, m_bucket: int, n: int) -> bool:
    """Whether SPLIT_K partial tiles of every M up to ``m_bucket`` fit the partials cap."""
    return split_k == 1 or split_k * m_bucket * n <= PARTIALS_CAP


def _partials(dev: torch.device, size: int) -> torch.Tensor:
    """A float32 buffer of >= ``size`` elements for split-K partial tiles (need not be zeroed:
    every slot is written before it is read). Grows outside CUDA-graph capture only."""
    key = str(dev)
    pw = _PARTIALS.get(key)
    if pw is None or pw.numel() < size:
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the split-K partials buffer must grow during CUDA-graph capture: run the step once "
                               "before capturing it")
        pw = torch.empty(max(size, 1), device=dev, dtype=torch.float32)
        _PARTIALS[key] = pw
    return pw


_WORKSPACES: dict = {}
MIN_BLOCK_N = 8  # the narrowest column tile a configuration may use (the split-K counters are sized for it)


def _workspace(dev: torch.device, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed float32 row (>= n: the GEMV kernels' split-K sums; the tensor-core kernel keeps
    its partial tiles in ``_partials``) and arrival counters for split-K tiles of up to m rows,
    one pair per device; the kernels leave both zeroed again. Grows outside CUDA-graph capture
    only. Matmuls of one device must not run concurrently on several streams (one decode stream
    is the use here)."""
    key = str(dev)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    tiles = triton.cdiv(n, MIN_BLOCK_N) * triton.cdiv(m, 16)  # counters for the smallest tiles (BLOCK_M >= 16)
    if ws is None or ws.numel() < n or cnt.numel() < tiles:
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the split-K workspace must grow during CUDA-graph capture: run the step once "
                               "before capturing it")
        size = max(n, 0 if ws is None else ws.numel())
        ws = torch.zeros(size, device=dev, dtype=torch.float32)
        cnt = torch.zeros(max(tiles, 0 if cnt is None else cnt.numel()), device=dev, dtype=torch.int32)
        _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def supported_group(bits: int, group_size: int, k: int) -> bool:
    """Whether the kernel tiles this group size (a step of BLOCK_K must stay inside one group)."""
    if group_size >= k:
        return True
    per = 32 // bits
    return any(group_size % d == 0 for d in (16, 32, 64, 128) if d >= 2 * per)


def matmul(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None,
           config: tuple[int, int, int, int, int] | None = None,
           gemv_config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ bias) for x [..., K] in bf16 / fp16 / fp32 on the weight's device; y in x's dtype.
    One row goes to the GEMV kernel, more rows to the tensor-core kernel. ``config`` /
    ``gemv_config`` (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages) skip autotuning (one of them is
    required under the interpreter, which cannot time); a ``config`` alone sends M = 1 to the
    tensor-core kernel too."""
    if x.shape[-1] != p.k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {p.k}")
    if not supported_group(p.bits, p.group_size, p.k):
        raise ValueError(f"group size {p.group_size} with {p.bits}-bit codes is not tiled by the kernel")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > PREFILL_M and config is None:
        y = torch.nn.functional.linear(x2, dequantize(p, x.dtype), bias)
        return y.reshape(*lead, p.n)
    out = torch.empty(m, p.n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out.reshape(*lead, p.n)
    bm = _block_m(m)
    ws, cnt = _workspace(x.device, m, p.n)
    lut = p.lut if p.lut is not None else p.scale  # placeholders for unused pointers
    zero = p.zero if p.zero is not None else p.scale
    b = bias if bias is not None else p.scale
    if m == 1 and p.lut is not None and _gsb(p.group_size, p.k, 128) is not None and config is None:
        gargs = (x2, p.qw, p.scale, zero, p.lut, b, out, ws, cnt, p.n, p.k, p.group_size, p.qw.stride(0),
                 p.scale.stride(0))
        gconsts = dict(BITS=p.bits, HAS_LUT=True, HAS_BIAS=bias is not None)
        if INTERPRET:
            _gemv_lut_kernel[(triton.cdiv(p.n, 32), 2)](*gargs, **gconsts, BLOCK_N=32, BLOCK_K=128,
                                                        GSB=_gsb(p.group_size, p.k, 128), SPLIT_K=2, num_warps=4)
        else:
            _lut_tuned[lambda meta: (triton.cdiv(p.n, meta["BLOCK_N"]), meta["SPLIT_K"])](*gargs, **gconsts)
        return out.reshape(*lead, p.n)
    if m == 1 and p.kmajor and (gemv_config is not None or config is None):
        gs = p.group_size if p.group_size < p.k else 1 << 30  # per channel: one group
        kargs = (x2, p.qw, p.scale, p.zero, b, out, ws, cnt, p.n, p.k, p.scale.shape[0], gs, p.scale.stride(0))
        half = GEMV_F16X2 and not INTERPRET and x.dtype != torch.float32
        kconsts = dict(HAS_BIAS=bias is not None, F16X2=half, XSCALE=half and KN_OVERFLOW == "xscale")
        if GEMV_PDL and not INTERPRET:
            # PDL from the second call of a weight on: the first may follow the kernels that packed it
            if p.__dict__.get("_launched", False):
                kconsts.update(PDL=True, launch_pdl=True)
            p.__dict__["_launched"] = True
        if gemv_config is None and not INTERPRET:
            _gemv_kn_tuned[lambda meta: (triton.cdiv(p.n, meta["BLOCK_N"]), meta["SPLIT"])](*kargs, **kconsts)
        else:
            if gemv_config is None:  # (the interpreter) the widest step the groups allow
                gemv_config = next((c for c in ((64, 8, 2, 4), (64, 4, 2, 4), (64, 2, 2, 4), (64, 1, 1, 4))
                                    if _kn_fits(c[1], c[2], p.group_size, p.k, p.qw.shape[0])), (64, 1, 1, 4))
            bn, bw, steps, warps = gemv_config[:4]
            if bn < MIN_BLOCK_N:
                raise ValueError(f"BLOCK_N={bn} is below {MIN_BLOCK_N}, the narrowest tile the split-K counters cover")
            if not _kn_fits(bw, steps, p.group_size, p.k, p.qw.shape[0]):
                raise ValueError(f"a K-major GEMV step of {bw} word rows x {steps} does not tile groups of "
                                 f"{p.group_size} and {p.qw.shape[0]} word rows")
            h = _kn_heuristics(dict(K=p.k, N=p.n, BW=bw, STEPS=steps, BLOCK_N=bn))
            _gemv_kn_kernel[(triton.cdiv(p.n, bn), h["SPLIT"])](*kargs, **kconsts, BLOCK_N=bn, BW=bw, STEPS=steps,
                                                                 SPLIT=h["SPLIT"], EVEN=h["EVEN"], num_warps=warps,
                                                                 num_stages=1)
        return out.reshape(*lead, p.n)
    if m == 1 and not p.kmajor and gemv_ok(p.bits, p.group_size, p.k) and (gemv_config is not None or config is None):
        table = p.lut if p.lut is not None else p.scale
        gs = p.group_size if p.group_size < p.k else p.qw.shape[1] * p.per_word  # per channel: one group
        gargs = (x2, p.qw, p.scale, zero, table, b, out, ws, cnt, p.n, p.k, p.qw.shape[1], p.scale.shape[1], gs,
                 p.qw.stride(0), p.scale.stride(0), (1 << p.bits) - 1)
        gconsts = dict(BITS=p.bits, HAS_LUT=p.lut is not None, HAS_BIAS=bias is not None,
                       F16X2=GEMV_F16X2 and not INTERPRET and x.dtype != torch.float32)
        if gemv_config is None and not INTERPRET:
            grid = lambda meta: (triton.cdiv(p.n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
            _gemv_tuned[grid](*gargs, **gconsts)
        else:
            bn, words, sk, warps, pf = gemv_config or (32, 32, 2, 4, True)
            sl = _slices(p.bits, p.group_size, p.k, words)
            if bn < MIN_BLOCK_N:
                raise ValueError(f"BLOCK_N={bn} is below {MIN_BLOCK_N}, the narrowest tile the split-K counters cover")
            if sl is None:
                raise ValueError(f"a GEMV step of {words} words does not tile groups of {p.group_size}")
            _gemv_even[(triton.cdiv(p.n, bn), sk)](*gargs, **gconsts, BLOCK_N=bn, NG=sl[0], WPG=sl[1], SPLIT_K=sk,
                                                   PREFETCH=bool(pf), num_warps=warps, num_stages=1)
        return out.reshape(*lead, p.n)
    mb = triton.next_power_of_2(m)
    if config is None and not INTERPRET:
        most = max(c[2] for c in _CONFIGS if _split_fits(c[2], mb, p.n))
    else:
        most = (config or (64, 64, 2, 4, 2))[2]
    pw = _partials(x.device, most * m * p.n)
    args = (x2, p.qw, p.scale, zero, lut, b, out, pw, cnt, m, p.n, p.k, p.group_size, x2.stride(0), out.stride(0),
            *p.qw_nk.stride(), *p.scale_ng.stride(), mb, (1 << p.bits) - 1)
    consts = dict(BITS=p.bits, HAS_LUT=p.lut is not None, HAS_BIAS=bias is not None,
                  FP32_DOT=x.dtype == torch.float32, BLOCK_M=bm)
    if config is None and not INTERPRET:
        grid = lambda meta: (triton.cdiv(p.n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(m, bm))  # noqa: E731
        _tuned[grid](*args, **consts)
    else:
        bn, bk, sk, warps, stages = config or (64, 64, 2, 4, 2)
        bk = min(bk, _bk_cap(p.group_size, p.k), PAD_K)
        grid = (triton.cdiv(p.n, bn), sk, triton.cdiv(m, bm))
        _wa16_kernel[grid](*args, **consts, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=warps, num_stages=stages)
    return out.reshape(*lead, p.n)
