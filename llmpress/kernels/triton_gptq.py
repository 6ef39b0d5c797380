"""Triton kernel for GPTQ's inner loop: one lazy batch of ``b`` columns (``b`` <= 128) solved in
registers, column after column, for a tile of rows.

GPTQ's rows are independent within a batch: row ``r`` of column ``i`` is rounded with its own
(precomputed, static) scale and zero point, its error is divided by ``U[i, i]`` and spread over
the row's remaining columns with ``U[i, i:]``. The torch reference
(:func:`llmpress.quant.gptq.gptq` on the CPU) launches about ten small kernels per column,
which makes it launch-bound on a GPU (tens of microseconds a column, ~27k columns in a
Llama-3-8B block). Here one program keeps a [BR, b] tile of W in registers and walks its
``b`` columns; one launch per batch, the trailing update stays a matmul in torch.

Runs under ``TRITON_INTERPRET=1`` on the CPU too, which is how CI tests it against the
reference loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _gptq_block_kernel(
    W, U, S, Z, M, Q, E,
    N, B, stride_w, stride_u, stride_s, stride_z, stride_m, stride_q, stride_e,
    qmin, qmax,
    HAS_ZERO: tl.constexpr, HAS_MASK: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    cols = tl.arange(0, BC)
    ok = (rows < N)[:, None] & (cols < B)[None, :]
    w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=ok, other=0.0)
    s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=ok, other=1.0)
    if HAS_ZERO:
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=ok, other=0.0)
    else:
        z = tl.zeros([BR, BC], dtype=tl.float32)
    if HAS_MASK:
        keep = tl.load(M + rows[:, None] * stride_m + cols[None, :], mask=ok, other=1).to(tl.float32)
    else:
        keep = tl.full([BR, BC], 1.0, dtype=tl.float32)
    q = tl.zeros([BR, BC], dtype=tl.float32)
    e = tl.zeros([BR, BC], dtype=tl.float32)
    for i in range(0, B):
        sel = (cols == i)[None, :]
        x = tl.sum(tl.where(sel, w, 0.0), axis=1)
        si = tl.sum(tl.where(sel, s, 0.0), axis=1)
        zi = tl.sum(tl.where(sel, z, 0.0), axis=1)
        ki = tl.sum(tl.where(sel, keep, 0.0), axis=1)
        r = _round_half_even(tl.math.div_rn(x, si) + zi)
        r = tl.minimum(tl.maximum(r, qmin), qmax)
        r = tl.where(ki != 0.0, r, zi)  # pruned entries sit on the zero point (dequantize to 0)
        dq = (r - zi) * si
        d = tl.load(U + i * stride_u + i)
        err = tl.math.div_rn(x - dq, d)
        urow = tl.load(U + i * stride_u + cols, mask=(cols >= i) & (cols < B), other=0.0)
        w = w - err[:, None] * urow[None, :]
        q = tl.where(sel, r[:, None], q)
        e = tl.where(sel, err[:, None], e)
    tl.store(Q + rows[:, None] * stride_q + cols[None, :], q, mask=ok)
    tl.store(E + rows[:, None] * stride_e + cols[None, :], e, mask=ok)


def gptq_block(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
               keep: torch.Tensor | None, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve one lazy batch: ``w`` [N, b] float32 weights (already updated by earlier batches),
    ``u`` [b, b] the batch's block of the upper Cholesky factor of H^-1, ``s``/``z`` [N, b] each
    column's scale / zero point (float32), ``keep`` [N, b] uint8 (1 = kept, 0 = pruned).
    Returns the codes [N, b] (float32 integers) and the scaled errors [N, b]."""
    n, b = w.shape
    if b > 128:
        raise ValueError(f"gptq_block takes at most 128 columns, got {b}")
    w, u, s = w.contiguous(), u.contiguous(), s.contiguous()
    z = None if z is None else z.contiguous()
    keep = None if keep is None else keep.contiguous()
    q = torch.empty_like(w)
    e = torch.empty_like(w)
    bc = max(16, triton.next_power_of_2(b))
    br = 16 if bc <= 64 else 8 if w.is_cuda else 16
    grid = (triton.cdiv(n, br),)
    _gptq_block_kernel[grid](
        w, u, s, s if z is None else z, w if keep is None else keep, q, e,
        n, b, w.stride(0), u.stride(0), s.stride(0), 0 if z is None else z.stride(0),
        0 if keep is None else keep.stride(0), q.stride(0), e.stride(0),
        float(qmin), float(qmax),
        HAS_ZERO=z is not None, HAS_MASK=keep is not None, BR=br, BC=bc, num_warps=4,
    )
    return q, e
