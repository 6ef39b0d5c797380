"""GGML K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and importance-weighted GGML blocks, solved in torch.

A K-quant cuts a row into super-blocks of 256 values and those into sub-blocks of 16 or 32:

- ``Q2_K`` / ``Q4_K`` / ``Q5_K`` (affine): ``x ~ d * sc_j * q - dmin * m_j`` with ``q`` in
  ``[0, 3 | 15 | 31]``, integer sub-block scales ``sc_j`` and minima ``m_j`` (4 bits for Q2_K,
  6 bits otherwise) and fp16 ``d``, ``dmin`` per super-block.
- ``Q3_K`` / ``Q6_K`` (symmetric): ``x ~ d * sc_j * q`` with ``q`` in ``[-4, 3]`` (``[-32, 31]``),
  signed 6-bit (8-bit) ``sc_j`` and an fp16 ``d``.

The solver minimises the (importance-)weighted squared error ``sum w (x - x_q)^2`` of the block:

1. per sub-block, a float scale (and offset) from a grid of candidate scales, each refitted by
   weighted least squares on the integers it rounds to (the search of llama.cpp's
   ``make_qkx2_quants`` / ``make_qx_quants``, on a wider grid);
2. the super-block's fp16 ``d`` (``dmin``) from candidate divisors of the largest sub-block
   scale, each scored by the error after the sub-block integers are rounded and the values
   re-assigned;
3. per sub-block, the best of the neighbouring integer scales (floor / ceil) given ``d``;
4. a joint least-squares refit of ``d`` and ``dmin`` on the chosen integers, kept per
   super-block only where it lowers the error.

Without importance weights ``w = 1`` (plain squared error). With them (``imatrix``: the mean
squared input of each column, the diagonal of the layer's Hessian) the error is what the
layer's output sees. The byte layouts are those of ggml-quants.c (checked by dequantizing with
the ``gguf`` package's reader in the tests). Pure functions: rows [R, K] in, bytes out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256


@dataclass(frozen=True)
class KSpec:
    sub: int  # values per sub-block
    qmin: int  # integer range of the values
    qmax: int
    affine: bool  # x ~ d*sc*q - dmin*m (else d*sc*q)
    smin: int  # integer range of the sub-block scales (and minima, affine)
    smax: int
    size: int  # bytes per super-block


SPECS = {
    "q2_k": KSpec(16, 0, 3, True, 0, 15, 84),
    "q3_k": KSpec(16, -4, 3, False, -32, 31, 110),
    "q4_k": KSpec(32, 0, 15, True, 0, 63, 144),
    "q5_k": KSpec(32, 0, 31, True, 0, 63, 176),
    "q6_k": KSpec(16, -32, 31, False, -128, 127, 210),
}
TYPES = tuple(SPECS)

_CHUNK = 2048  # super-blocks solved at a time on the CPU (bounds the candidate tensors to ~50 MB)
_CHUNK_CUDA = 32768  # on a GPU (~0.9 GB per candidate tensor): fewer, larger kernels


def _f16(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (what the file stores), kept as float32; overflow clamped."""
    return v.clamp(-65504.0, 65504.0).to(torch.float16).float()


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


# ---------------------------------------------------------------- sub-block fits (shared)


def fit_affine(x: torch.Tensor, w: torch.Tensor, nq: int, *, clamp_offset: bool = True,
               steps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``x ~ s * q + o`` with integer ``q`` in ``[0, nq]`` per row of x [..., n] under
    weights w; returns (s, o) [...]. ``clamp_offset`` keeps ``o <= 0`` (K-quant minima are
    stored as non-negative ``-o``)."""
    if steps is None:
        steps = torch.linspace(-1.0, 1.5, 26)
    lo = x.amin(-1, keepdim=True)
    if clamp_offset:
        lo = lo.clamp(max=0)
    hi = x.amax(-1, keepdim=True)
    rng = hi - lo
    xs, ws = x.unsqueeze(-2), w.unsqueeze(-2)  # [..., 1, n]
    iscale = _safe_div((nq + steps.to(x)).view(*([1] * (x.dim() - 1)), -1, 1), rng.unsqueeze(-1))  # [..., C, 1]
    q = torch.round((xs - lo.unsqueeze(-1)) * iscale).clamp(0, nq)
    sw, swq, swq2 = ws.sum(-1), (ws * q).sum(-1), (ws * q * q).sum(-1)
    swx, swqx = (ws * xs).sum(-1), (ws * q * xs).sum(-1)
    det = sw * swq2 - swq * swq
    s = _safe_div(sw * swqx - swq * swx, det)
    o = _safe_div(swq2 * swx - swq * swqx, det)
    if clamp_offset:
        pos = o > 0
        s = torch.where(pos, _safe_div(swqx, swq2), s)
        o = torch.where(pos, torch.zeros_like(o), o)
    flat = det <= 1e-12 * sw * swq2.clamp(min=1)  # all integers equal: keep the range's own scale
    s = torch.where(flat, (rng / nq).expand_as(s), s)
    o = torch.where(flat, lo.expand_as(o), o)
    err = (ws * (s.unsqueeze(-1) * q + o.unsqueeze(-1) - xs) ** 2).sum(-1)
    best = err.argmin(-1, keepdim=True)
    return s.gather(-1, best).squeeze(-1), o.gather(-1, best).squeeze(-1)


def fit_symmetric(x: torch.Tensor, w: torch.Tensor, qmin: int, qmax: int,
                  steps: torch.Tensor | None = None) -> torch.Tensor:
    """Best ``x ~ s * q`` with integer ``q`` in ``[qmin, qmax]`` per row of x [..., n]; returns
    s [...] (signed: the sign decides which end gets the extra negative level)."""
    if steps is None:
        steps = torch.linspace(-1.0, 1.0, 21)
    big = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude [..., 1]
    st = steps.to(x)
    # the largest value on the -qmin end (llama.cpp's choice) or on the +qmax end
    cand = torch.cat([-(-qmin + st), qmax + st]).view(*([1] * (x.dim() - 1)), -1, 1)
    iscale = _safe_div(cand, big.unsqueeze(-1))
    xs, ws = x.unsqueeze(-2), w.unsqueeze(-2)
    q = torch.round(xs * iscale).clamp(qmin, qmax)
    s = _safe_div((ws * q * xs).sum(-1), (ws * q * q).sum(-1))
    err = (ws * (s.unsqueeze(-1) * q - xs) ** 2).sum(-1)
    return s.gather(-1, err.argmin(-1, keepdim=True)).squeeze(-1)


# ---------------------------------------------------------------- super-block solve


def _assign(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    """Nearest integers for x [..., n] on the grid ``scale * q + offset`` ([..., 1])."""
    v = x if offset is None else x - offset
    return torch.round(_safe_div(v, scale.expand_as(v))).clamp(qmin, qmax)


def _sub_error(x, w, scale, offset, q):
    y = scale * q if offset is None else scale * q + offset
    return (w * (y - x) ** 2).sum(-1)


def _quantize_subscales(v: torch.Tensor, x: torch.Tensor, w: torch.Tensor, spec: KSpec,
                        d: torch.Tensor, other: tuple | None, which: str) -> torch.Tensor:
    """Integer sub-block scales (``which='scale'``) or minima (``'min'``) for super-block
    divisors d [B, 1, 1]: floor or ceil of ``v / d`` [B, S], whichever gives the lower error
    with the other factor fixed (``other``: the other's float values times divisor)."""
    lo_i = spec.smin if which == "scale" else 0
    base = torch.floor(_safe_div(v.unsqueeze(-1), d)).squeeze(-1)
    best_err, best = None, None
    for k in (0.0, 1.0):
        cand = (base + k).clamp(lo_i, spec.smax)
        if which == "scale":
            sc = d.squeeze(-1) * cand
            off = None if other is None else other
        else:
            sc = other
            off = -d.squeeze(-1) * cand
        q = _assign(x, sc.unsqueeze(-1), None if off is None else off.unsqueeze(-1), spec.qmin, spec.qmax)
        err = _sub_error(x, w, sc.unsqueeze(-1), None if off is None else off.unsqueeze(-1), q)
        if best is None:
            best_err, best = err, cand
        else:
            take = err < best_err
            best = torch.where(take, cand, best)
            best_err = torch.where(take, err, best_err)
    return best


def _solve_chunk(x: torch.Tensor, w: torch.Tensor, spec: KSpec) -> dict[str, torch.Tensor]:
    """Super-blocks x [B, 256] -> d [B], dmin [B] (affine), sc [B, S], m [B, S], q [B, 256]."""
    b = x.shape[0]
    s_n = QK_K // spec.sub
    xs, ws = x.view(b, s_n, spec.sub), w.view(b, s_n, spec.sub)
    if spec.affine:
        s, o = fit_affine(xs, ws, spec.qmax)
        mins = (-o).clamp(min=0)
    else:
        s = fit_symmetric(xs, ws, spec.qmin, spec.qmax)
        mins = None

    def total(d, dm, sc_i, m_i):
        scale = (d * sc_i).unsqueeze(-1)
        off = None if dm is None else (-(dm * m_i)).unsqueeze(-1)
        q = _assign(xs, scale, off, spec.qmin, spec.qmax)
        return _sub_error(xs, ws, scale, off, q).sum(-1), q

    # 2. divisor of the sub-block scales: candidates around (largest scale) / (top integer)
    if spec.affine:
        top = s.amax(-1, keepdim=True)
        divs = [top / (spec.smax + g) for g in (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0)]
        mtop = mins.amax(-1, keepdim=True)
        dmin = _f16(mtop / spec.smax)
        m_i0 = torch.round(_safe_div(mins, dmin.expand_as(mins))).clamp(0, spec.smax)
    else:
        big = s.gather(-1, s.abs().argmax(-1, keepdim=True))
        divs = [big / -(-spec.smin + g) for g in (-2.0, -1.0, -0.5, 0.0, 0.5)] + \
               [big / (spec.smax + g) for g in (-1.0, 0.0, 0.5)]
        dmin, m_i0 = None, None
    best = None
    for dv in divs:
        d = _f16(dv)
        sc_i = torch.round(_safe_div(s, d.expand_as(s))).clamp(spec.smin, spec.smax)
        err, _ = total(d, dmin, sc_i, m_i0)
        if best is None:
            best = [err, d, sc_i]
        else:
            take = err < best[0]
            best = [torch.where(take, err, best[0]), torch.where(take.unsqueeze(-1), d, best[1]),
                    torch.where(take.unsqueeze(-1), sc_i, best[2])]
    err, d, sc_i = best
    m_i = m_i0
    if spec.affine:  # the minima's divisor, scored the same way
        for g in (-2.0, -1.0, 0.5, 1.0):
            dm = _f16(mtop / (spec.smax + g))
            mi = torch.round(_safe_div(mins, dm.expand_as(mins))).clamp(0, spec.smax)
            e, _ = total(d, dm, sc_i, mi)
            take = e < err
            err = torch.where(take, e, err)
            dmin = torch.where(take.unsqueeze(-1), dm, dmin)
            m_i = torch.where(take.unsqueeze(-1), mi, m_i)

    # 3. floor / ceil of each sub-block's integers given the divisors
    d3 = d.unsqueeze(-1)
    if spec.affine:
        sc_n = _quantize_subscales(s, xs, ws, spec, d3, -(dmin * m_i), "scale")
        m_n = _quantize_subscales(mins, xs, ws, spec, dmin.unsqueeze(-1), d * sc_n, "min")
        e, _ = total(d, dmin, sc_n, m_n)
        take = e < err
        err, sc_i, m_i = (torch.where(take, e, err), torch.where(take.unsqueeze(-1), sc_n, sc_i),
                          torch.where(take.unsqueeze(-1), m_n, m_i))
    else:
        sc_n = _quantize_subscales(s, xs, ws, spec, d3, None, "scale")
        e, _ = total(d, None, sc_n, None)
        take = e < err
        err, sc_i = torch.where(take, e, err), torch.where(take.unsqueeze(-1), sc_n, sc_i)

    # 4. joint least-squares refit of the fp16 divisors on the chosen integers, twice
    for _ in range(2):
        _, q = total(d, dmin, sc_i, m_i)
        a = (sc_i.unsqueeze(-1) * q).reshape(b, -1)  # x ~ d*a - dmin*c
        wf, xf = ws.reshape(b, -1), xs.reshape(b, -1)
        saa, sax = (wf * a * a).sum(-1), (wf * a * xf).sum(-1)
        if spec.affine:
            c = m_i.unsqueeze(-1).expand_as(q).reshape(b, -1)
            scc, sac, scx = (wf * c * c).sum(-1), (wf * a * c).sum(-1), (wf * c * xf).sum(-1)
            det = saa * scc - sac * sac
            dn = _f16(_safe_div(sax * scc - scx * sac, det)).unsqueeze(-1)
            dmn = _f16(_safe_div(sax * sac - scx * saa, det)).unsqueeze(-1)
            ok = (det > 0).unsqueeze(-1) & (dn > 0) & (dmn >= 0)
            dn, dmn = torch.where(ok, dn, d), torch.where(ok, dmn, dmin)
        else:
            dn, dmn = _f16(_safe_div(sax, saa)).unsqueeze(-1), None
        e, _ = total(dn, dmn, sc_i, m_i)
        take = e < err
        err = torch.where(take, e, err)
        d = torch.where(take.unsqueeze(-1), dn, d)
        if spec.affine:
            dmin = torch.where(take.unsqueeze(-1), dmn, dmin)
    _, q = total(d, dmin, sc_i, m_i)
    out = {"d": d.squeeze(-1), "sc": sc_i.to(torch.int32), "q": q.reshape(b, QK_K).to(torch.int32)}
    if spec.affine:
        out["dmin"] = dmin.squeeze(-1)
        out["m"] = m_i.to(torch.int32)
    return out


# ---------------------------------------------------------------- packing (ggml-quants.c layouts)


def _f16b(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def _pack_bits(q: torch.Tensor, shape: tuple[int, ...], bits: int) -> torch.Tensor:
    """Values q [n, 256] viewed as [n, *shape] with the planes on dim -2: byte = sum over planes
    of plane_k << (bits * k)."""
    v = q.reshape(q.shape[0], *shape).to(torch.int32)
    sh = (torch.arange(v.shape[-2], dtype=torch.int32, device=v.device) * bits).view(-1, 1)
    return (v << sh).sum(-2).to(torch.uint8).reshape(q.shape[0], -1)


def _k4_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and minima [n, 8] -> the 12 bytes of Q4_K / Q5_K."""
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    b0 = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b1 = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([b0, b1, b2], -1).to(torch.uint8)


def pack(sol: dict[str, torch.Tensor], qtype: str) -> torch.Tensor:
    """A solved chunk -> [n, bytes per super-block] uint8 in ggml's block layout."""
    q, sc, n = sol["q"], sol["sc"], sol["q"].shape[0]
    if qtype == "q2_k":
        scales = (sc | (sol["m"] << 4)).to(torch.uint8)
        return torch.cat([scales, _pack_bits(q, (2, 4, 32), 2), _f16b(sol["d"]), _f16b(sol["dmin"])], -1)
    if qtype == "q3_k":
        u = q + 4  # [0, 8): low 2 bits in qs, bit 2 in hmask
        hmask = _pack_bits(u >> 2, (8, 32), 1)
        qs = _pack_bits(u & 3, (2, 4, 32), 2)
        s = (sc + 32).to(torch.int32)
        low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)  # scale j -> byte j % 8, nibble j // 8
        high = ((s >> 4) & 3).view(n, 4, 4)  # scale j = 4k + i -> byte i, bits 2k
        high = (high << (torch.arange(4, dtype=torch.int32, device=s.device) * 2).view(1, 4, 1)).sum(1)
        scales = torch.cat([low, high], -1).to(torch.uint8)
        return torch.cat([hmask, qs, scales, _f16b(sol["d"])], -1)
    if qtype in ("q4_k", "q5_k"):
        head = [_f16b(sol["d"]), _f16b(sol["dmin"]), _k4_scales(sc, sol["m"])]
        ql = _pack_bits(q & 0xF, (4, 2, 32), 4)
        if qtype == "q4_k":
            return torch.cat([*head, ql], -1)
        return torch.cat([*head, _pack_bits(q >> 4, (8, 32), 1), ql], -1)
    if qtype == "q6_k":
        u = q + 32
        ql = _pack_bits(u & 0xF, (2, 2, 64), 4)
        qh = _pack_bits(u >> 4, (2, 4, 32), 2)
        return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16b(sol["d"])], -1)
    raise ValueError(f"not a K-quant type: {qtype!r}; allowed: {list(TYPES)}")


def quantize_rows(w: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """A weight [R, K] (K a multiple of 256) as K-quant ``qtype`` bytes [R, K / 256 * size];
    ``imatrix`` [K] weighs each column's squared error (mean squared input of the column)."""
    spec = SPECS.get(qtype)
    if spec is None:
        raise ValueError(f"not a K-quant type: {qtype!r}; allowed: {list(TYPES)}")
    w = w.detach().float()  # solved where it lives (a GPU is ~100x faster); bytes come back to the CPU
    r, k = w.shape
    if k % QK_K:
        raise ValueError(f"row length {k} is not a multiple of the {qtype} super-block size {QK_K}")
    x = w.reshape(-1, QK_K)
    if imatrix is None:
        wt = torch.ones_like(x)
    else:
        wt = _importance(imatrix.to(w.device), k).view(1, k).expand(r, k).reshape(-1, QK_K)
    out = torch.empty(x.shape[0], spec.size, dtype=torch.uint8)
    ch = _CHUNK_CUDA if x.is_cuda else _CHUNK
    for i in range(0, x.shape[0], ch):
        out[i:i + ch] = pack(_solve_chunk(x[i:i + ch], wt[i:i + ch], spec), qtype).cpu()
    return out.reshape(r, k // QK_K * spec.size)


def _importance(imatrix: torch.Tensor, k: int) -> torch.Tensor:
    im = imatrix.detach().float().reshape(-1)
    if im.numel() != k:
        raise ValueError(f"importance vector has {im.numel()} entries for rows of {k}")
    if not torch.isfinite(im).all() or (im < 0).any():
        raise ValueError("importance vector has negative or non-finite entries")
    # a column no calibration token touched still counts a little (else any value would do)
    floor = float(im.mean()) * 1e-4 if im.sum() > 0 else 1.0
    return im.clamp(min=floor)


# ---------------------------------------------------------------- weighted legacy blocks

LEGACY = {"q4_0": (-8, 7, False), "q5_0": (-16, 15, False), "q8_0": (-128, 127, False),
          "q4_1": (0, 15, True), "q5_1": (0, 31, True)}


def quantize_legacy_weighted(w: torch.Tensor, qtype: str, imatrix: torch.Tensor) -> torch.Tensor:
    """Q4_0 / Q5_0 / Q8_0 / Q4_1 / Q5_1 blocks chosen to minimise the importance-weighted
    error (the reference quantizers in ``ggml`` round the extremes instead)."""
    from llmpress.quant import ggml

    qmin, qmax, affine = LEGACY[qtype]
    w = w.detach().float()
    r, k = w.shape
    x = w.reshape(-1, 32)
    wt = _importance(imatrix.to(w.device), k).view(1, k).expand(r, k).reshape(-1, 32)
    out = []
    for i in range(0, x.shape[0], _CHUNK * 8):
        xc, wc = x[i:i + _CHUNK * 8], wt[i:i + _CHUNK * 8]
        if affine:
            s, o = fit_affine(xc, wc, qmax, clamp_offset=False)
            d, m = _f16(s).unsqueeze(-1), _f16(o).unsqueeze(-1)
            q = _assign(xc, d, m, qmin, qmax)
            out.append(ggml.pack_block(qtype, d, q, m).cpu())
        else:
            s = fit_symmetric(xc, wc, qmin, qmax, torch.linspace(-1.0, 1.0, 21) * (1 if qmax < 100 else 4))
            d = _f16(s).unsqueeze(-1)
            q = _assign(xc, d, None, qmin, qmax)
            out.append(ggml.pack_block(qtype, d, q - qmin if qtype != "q8_0" else q, None).cpu())
    return torch.cat(out).reshape(r, -1)
