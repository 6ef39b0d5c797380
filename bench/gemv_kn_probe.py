"""Probe: an M = 1 GEMV over a K-major packed layout (words [K / 8, N], each word row one
coalesced line across columns; scales and zero points [G, N]), one program per (column tile,
share of K) with no loop over K, partial sums added atomically (GemLite's "split-K GEMV" shape),
against the shipped GEMV (words [N, K / 8], a loop over K per program) and bf16 cuBLAS.

Same packed-half arithmetic as the shipped kernel (``triton_wa16._W4X2_DOT_F16X2``), so the
comparison is the layout and the work split, not the instruction mix.

    python bench/gemv_kn_probe.py --out DIR          # H100: check, sweep, table, JSON
    TRITON_INTERPRET=1 python bench/gemv_kn_probe.py --interpret   # CPU: float32 path only
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.py"))
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)
SHAPES, copy_ceiling, graph_time, make_qw = (bench_kernels.SHAPES, bench_kernels.copy_ceiling, bench_kernels.graph_time,
                                             bench_kernels.make_qw)

from llmpress.kernels import layout  # noqa: E402
from llmpress.kernels import triton_wa16 as tw  # noqa: E402
from llmpress.quant.primitives import QuantScheme  # noqa: E402


@triton.jit
def _gemv_kn(X, QT, ST, ZT, O, WS, CNT, N, K, GS,
             BLOCK_N: tl.constexpr, BW: tl.constexpr, STEPS: tl.constexpr, SPLIT: tl.constexpr,
             HALF: tl.constexpr):
    """Program (pid_n, pid_k): columns [pid_n * BLOCK_N, +BLOCK_N), codes of STEPS steps of BW
    words per column from k = pid_k * STEPS * BW * 8 on (a step inside one group)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for st in tl.static_range(STEPS):
        w0 = (pid_k * STEPS + st) * BW  # first word row of the step
        k0 = w0 * 8
        g = k0 // GS
        s = tl.load(ST + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(ZT + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if HALF:
            ri = tl.arange(0, BW // 2)
            pe = tl.load(QT + (w0 + 2 * ri)[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)
            po = tl.load(QT + (w0 + 2 * ri + 1)[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)
            kb = (k0 + 16 * ri)[:, None]
            a0, b0, c0, d0, xs0 = tw._x_pairs(X, kb, K, 0.25, True)
            a1, b1, c1, d1, xs1 = tw._x_pairs(X, kb + 8, K, 0.25, True)
            t = tl.inline_asm_elementwise(
                tw._W4X2_DOT_F16X2, "=f,r,r,r,r,r,r,r,r,r,r",
                [pe, po, tl.broadcast_to(a0, pe.shape), tl.broadcast_to(b0, pe.shape), tl.broadcast_to(c0, pe.shape),
                 tl.broadcast_to(d0, pe.shape), tl.broadcast_to(a1, pe.shape), tl.broadcast_to(b1, pe.shape),
                 tl.broadcast_to(c1, pe.shape), tl.broadcast_to(d1, pe.shape)],
                dtype=tl.float32, is_pure=True, pack=1)
            xs = tl.sum(xs0 + xs1, axis=0)  # [1]
            acc += tl.sum(t, axis=0) * (s * 4.0) - (z - 8.0) * s * xs
        else:
            ri = tl.arange(0, BW)
            p = tl.load(QT + (w0 + ri)[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)
            t = tl.zeros((BW, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((BW, 1), dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(X + (k0 + 8 * ri + j)[:, None]).to(tl.float32)
                xs += xj
                t += ((p >> (4 * j)) & 15).to(tl.float32) * xj
            acc += tl.sum(t, axis=0) * s - z * s * tl.sum(xs, axis=0)
    tw._store_row(acc, offs_n, n_ok, X, O, WS, CNT, pid_n, SPLIT, False)


@triton.jit
def _kn_floor(QT, ST, O, WS, CNT, N, BLOCK_N: tl.constexpr, BW: tl.constexpr, SPLIT: tl.constexpr,
              MODE: tl.constexpr):
    """Diagnostic (not a matmul): the K-major GEMV's grid and loads with almost no arithmetic,
    to split its time into reading and finishing. Each program loads BW word rows and one
    scale row of its column tile and sums the words per column; then MODE 0 stores that in
    its own slot (no atomics: the read floor of this grid), 1 adds it atomically into the
    workspace (no arrival counter), 2 finishes like the shipped kernel (atomics, counter, the
    last program of the tile writes y and re-zeroes)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri = tl.arange(0, BW)
    w0 = pid_k * BW
    p = tl.load(QT + (w0 + ri)[:, None] * N + offs_n[None, :])
    sc = tl.load(ST + (w0 // 16) * N + offs_n).to(tl.float32)
    v = tl.sum(p, axis=0).to(tl.float32) * sc
    if MODE == 0:
        tl.store(WS + pid_k * N + offs_n, v)
    elif MODE == 1:
        tl.atomic_add(WS + offs_n, v)
    else:
        tw._store_row(v, offs_n, offs_n < N, O, O, WS, CNT, pid_n, SPLIT, False)


FUSED_SHAPES = [(6144, 4096), (28672, 4096)]  # Llama-3-8B's q/k/v and gate/up, stacked


def _w4_copies(dev, n: int, k: int):
    """bf16 copies and W4 g128 sym K-major packs of one seeded weight (more than 200 MB of bf16
    in all, so that a graph of calls reads from HBM), and an x row."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device=dev) * 0.02
    r = max(4, int(200e6 // (n * k * 2)) + 1)
    wb = [w.to(torch.bfloat16).clone() for _ in range(r)]
    p0 = layout.pack(make_qw(w.float(), QuantScheme(4, True, "group", 128)), torch.bfloat16)
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    return wb, p0, [p0] + [p0.clone() for _ in range(r - 1)], x


def floor(dev, ceil: float, out: str) -> None:
    """Where the shipped K-major GEMV's time goes (W4 g128, M = 1): its time against
    ``_kn_floor`` in each MODE over the same bytes and grids, and bf16 cuBLAS."""
    rows = []
    for n, k in SHAPES + FUSED_SHAPES:
        wb, p0, ps, x = _w4_copies(dev, n, k)
        res = [("bf16 cuBLAS", graph_time([lambda W=W: F.linear(x, W) for W in wb]), n * k * 2)]
        tw.matmul(x, p0)
        res.append((f"shipped (autotuned {tw._gemv_kn_tuned.best_config.kwargs})",
                    graph_time([lambda P=P: tw.matmul(x, P) for P in ps]), p0.nbytes))
        kw = p0.qw.shape[0]
        for bn, bw, wp in ((512, 16, 4), (1024, 16, 8), (512, 32, 8), (256, 16, 4)):
            if n % bn or kw % bw:
                continue
            split = kw // bw
            ws = torch.zeros(split * n, device=dev)
            cnt = torch.zeros(n // bn, device=dev, dtype=torch.int32)
            o = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
            for mode in (0, 1, 2):
                def call(P, mode=mode, bn=bn, bw=bw, wp=wp, split=split, ws=ws, cnt=cnt, o=o):
                    _kn_floor[(n // bn, split)](P.qw, P.scale, o, ws, cnt, n, BLOCK_N=bn, BW=bw, SPLIT=split, MODE=mode,
                                                num_warps=wp, num_stages=1)
                if mode == 2:
                    ws.zero_()
                res.append((f"floor mode {mode} ({bn}, {bw}, {wp} warps)", graph_time([lambda P=P: call(P) for P in ps]),
                            p0.qw.numel() * 4 + p0.scale.numel() * 2))
        for name, t, nb in res:
            rows.append({"shape": f"{n}x{k}", "kernel": name, "ms": t * 1e3, "bytes": nb, "pct_copy_ceiling": 100 * nb / t / ceil})
            print(f"  {n}x{k} {name:70s} {t * 1e6:7.1f} us {100 * nb / t / ceil:5.1f}%", flush=True)
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gemv-kn-floor.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "copy_ceiling_tb_s": ceil / 1e12, "rows": rows}, indent=1))


def kn_layout(p: layout.PackedWeight):
    """Words [KW, N], scales / zero points [G, N] (4-bit only)."""
    assert p.bits == 4
    return p.qw.t().contiguous(), p.scale.t().contiguous(), p.zero.t().contiguous()


def kn_matmul(x: torch.Tensor, p: layout.PackedWeight, kn, cfg, half: bool) -> torch.Tensor:
    qt, st, zt = kn
    bn, bw, steps, warps = cfg
    k_words = p.k // 8
    assert k_words % (bw * steps) == 0 and (p.group_size >= p.k or (p.group_size // 8) % bw == 0)
    split = k_words // (bw * steps)
    out = torch.empty(1, p.n, device=x.device, dtype=x.dtype)
    ws, cnt = tw._workspace(x.device, 1, p.n)
    gs = p.group_size if p.group_size < p.k else 1 << 30
    _gemv_kn[(triton.cdiv(p.n, bn), split)](x, qt, st, zt, out, ws, cnt, p.n, p.k, gs, BLOCK_N=bn, BW=bw,
                                            STEPS=steps, SPLIT=split, HALF=half, num_warps=warps)
    return out


def interpret_check() -> None:
    g = torch.Generator().manual_seed(0)
    for n, k, sch in [(72, 256, QuantScheme(4, True, "group", 128)), (40, 512, QuantScheme(4, False, "group", 64))]:
        w = torch.randn(n, k, generator=g)
        p = layout.pack(make_qw(w, sch), torch.float32, kmajor=False)
        x = torch.randn(1, k, generator=g)
        ref = layout.reference_matmul(x, p)
        y = kn_matmul(x, p, kn_layout(p), (32, 8, 2, 4), False)
        err = float((y - ref).norm() / ref.norm())
        print(n, k, sch.describe(), f"rel err {err:.2e}")
        assert err < 1e-4


def shipped(dev, ceil: float, out: str) -> None:
    """The shipped K-major GEMV (triton_wa16._gemv_kn_kernel), W4 g128 sym, M = 1: its autotuned
    pick with and without programmatic dependent launch (PDL), then the first configurations
    with each overflow guard (check: the float32 redo; none; xscale) and PDL off / on. The
    fused decode shapes (q/k/v 6144x4096, gate/up 28672x4096) get the autotuned rows only."""
    rows = []
    print(f"PDL supported by this Triton: {tw._PDL_SUPPORTED}", flush=True)
    pdls = (False, True) if tw._PDL_SUPPORTED else (False,)
    for n, k in SHAPES + FUSED_SHAPES:
        wb, p0, ps, x = _w4_copies(dev, n, k)
        ref = layout.reference_matmul(x.float(), p0).float()
        t_bf = graph_time([lambda W=W: F.linear(x, W) for W in wb])
        res = []
        for pdl in pdls:
            tw.GEMV_PDL = pdl
            for ov in ("check", "xscale"):
                tw.KN_OVERFLOW = ov
                try:
                    y = tw.matmul(x, p0)
                    y = tw.matmul(x, p0)  # (the second call of a weight is the first with PDL)
                    err = float((y.float() - ref).norm() / ref.norm())
                    t = graph_time([lambda P=P: tw.matmul(x, P) for P in ps])
                    res.append((f"autotuned {ov} pdl={pdl} err={err:.1e} pick {tw._gemv_kn_tuned.best_config}", t))
                except Exception as e:  # noqa: BLE001
                    print(f"  autotuned {ov} pdl={pdl} FAILED {e!r}"[:300], flush=True)
        tw.GEMV_PDL, tw.KN_OVERFLOW = tw._PDL_SUPPORTED, "check"
        ws, cnt = tw._workspace(dev, 1, n)
        for cfg in (tw._KN_CONFIGS[:4] if (n, k) in SHAPES else []):
            bn, bw, st, wp = cfg
            if not tw._kn_fits(bw, st, 128, k, p0.qw.shape[0]):
                continue
            h = tw._kn_heuristics(dict(K=k, N=n, BW=bw, STEPS=st, BLOCK_N=bn))
            for check, xscale in ((True, False), (False, False), (False, True)):
                for pdl in pdls:
                    def call(P, xx=x, bn=bn, bw=bw, st=st, wp=wp, h=h, check=check, xscale=xscale, pdl=pdl):
                        o = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
                        extra = dict(PDL=True, launch_pdl=True) if pdl else {}
                        tw._gemv_kn_kernel[(triton.cdiv(n, bn), h["SPLIT"])](
                            xx, P.qw, P.scale, P.zero, P.scale, o, ws, cnt, n, k, P.scale.shape[0], 128, P.scale.stride(0),
                            HAS_BIAS=False, BLOCK_N=bn, BW=bw, STEPS=st, SPLIT=h["SPLIT"], EVEN=h["EVEN"], F16X2=True,
                            CHECK=check, XSCALE=xscale, num_warps=wp, num_stages=1, **extra)
                        return o
                    try:
                        err = float((call(p0).float() - ref).norm() / ref.norm())
                        big = x * 3e4  # fp16 sums overflow at c = 1/4: the redo (check) or the scaling must hold
                        refb = layout.reference_matmul(big.float(), p0).float()
                        errb = float((call(p0, big).float() - refb).norm() / refb.norm())
                        res.append((f"{cfg} check={check} xscale={xscale} pdl={pdl} err={err:.1e} big={errb:.1e}",
                                    graph_time([lambda P=P: call(P) for P in ps])))
                    except Exception as e:  # noqa: BLE001
                        print(f"  {cfg} check={check} xscale={xscale} pdl={pdl} FAILED {e!r}"[:300], flush=True)
        for name, t in res:
            rows.append({"shape": f"{n}x{k}", "kernel": name, "ms": t * 1e3, "pct_copy_ceiling": 100 * p0.nbytes / t / ceil,
                         "speedup_vs_bf16": t_bf / t})
            print(f"  {n}x{k} {name:80s} {t * 1e6:7.1f} us {100 * p0.nbytes / t / ceil:5.1f}% {t_bf / t:5.2f}x", flush=True)
        rows.append({"shape": f"{n}x{k}", "kernel": "bf16 cuBLAS", "ms": t_bf * 1e3,
                     "pct_copy_ceiling": 100 * n * k * 2 / t_bf / ceil, "speedup_vs_bf16": 1.0})
        print(f"  {n}x{k} {'bf16 cuBLAS':80s} {t_bf * 1e6:7.1f} us {100 * n * k * 2 / t_bf / ceil:5.1f}%", flush=True)
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gemv-kn-shipped.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "copy_ceiling_tb_s": ceil / 1e12, "triton": triton.__version__,
             "pdl_supported": tw._PDL_SUPPORTED, "rows": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--shipped", action="store_true", help="time the shipped K-major GEMV's configurations")
    ap.add_argument("--floor", action="store_true", help="split the shipped GEMV's time: read floor, atomics, finish")
    args = ap.parse_args()
    if args.interpret:
        interpret_check()
        return
    dev = torch.device("cuda")
    ceil = copy_ceiling(dev)
    print(f"copy ceiling {ceil / 1e12:.2f} TB/s on {torch.cuda.get_device_name()}", flush=True)
    if args.shipped:
        shipped(dev, ceil, args.out)
        return
    if args.floor:
        floor(dev, ceil, args.out)
        return
    # correctness on ragged-ish shapes (N not a tile multiple), both paths
    g = torch.Generator().manual_seed(3)
    worst, bad = 0.0, 0
    for n, k, sch in [(1000, 1024, QuantScheme(4, True, "group", 128)), (4100, 2048, QuantScheme(4, False, "group", 64)),
                      (777, 4096, QuantScheme(4, False, "group", 128)), (4096, 14336, QuantScheme(4, True, "group", 128))]:
        w = torch.randn(n, k, generator=g)
        q = make_qw(w, sch)
        p = layout.pack(q, torch.bfloat16, kmajor=False).to(dev)
        kn = kn_layout(p)
        x = torch.randn(1, k, generator=g).to(dev, torch.bfloat16)
        ref = layout.reference_matmul(x.float(), layout.pack(q, torch.float32, kmajor=False).to(dev))
        for cfg in [(256, 8, 2, 4), (512, 16, 1, 8)]:
            if (p.group_size // 8) % cfg[1]:
                continue
            for half in (False, True):
                y = kn_matmul(x, p, kn, cfg, half)
                err = float(((y.float() - ref).norm() / ref.norm()).item())
                worst = max(worst, err)
                if not (err < 1e-2 and torch.isfinite(y).all()):
                    bad += 1
                    print("  FAIL", n, k, sch.describe(), cfg, half, err)
    print(f"check: {bad} failures, worst rel err {worst:.2e}", flush=True)

    rows = []
    sweep = [c for c in itertools.product((128, 256, 512, 1024), (8, 16, 32), (1, 2, 4), (4, 8))
             if 4 <= c[0] * c[1] * c[2] // (32 * c[3]) <= 64]
    for n, k in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev) * 0.02
        r = max(4, int(200e6 // (n * k * 2)) + 1)
        wb = [w.to(torch.bfloat16).clone() for _ in range(r)]
        p0 = layout.pack(make_qw(w.float(), QuantScheme(4, True, "group", 128)), torch.bfloat16, kmajor=False)
        ps = [p0] + [layout.PackedWeight(p0.qw.clone(), p0.scale.clone(), p0.zero.clone(), None, 4, 128, n, k)
                     for _ in range(r - 1)]
        kns = [kn_layout(p) for p in ps]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        t_bf = graph_time([lambda W=W: F.linear(x, W) for W in wb])
        tw.matmul(x, ps[0])
        t_cur = graph_time([lambda P=P: tw.matmul(x, P) for P in ps])
        nb = p0.nbytes

        def row(name, t, cfg=None):
            rows.append({"kernel": name, "shape": f"{n}x{k}", "M": 1, "config": cfg, "ms": t * 1e3,
                         "pct_copy_ceiling": 100 * (n * k * 2 if name == "bf16 cuBLAS" else nb) / t / ceil,
                         "speedup_vs_bf16": t_bf / t})

        row("bf16 cuBLAS", t_bf)
        row("shipped gemv (autotuned)", t_cur)
        best = []
        for cfg in sweep:
            if (k // 8) % (cfg[1] * cfg[2]):
                continue
            try:
                kn_matmul(x, ps[0], kns[0], cfg, True)
                t = graph_time([lambda P=P, Q=Q: kn_matmul(x, P, Q, cfg, True) for P, Q in zip(ps, kns)])
            except Exception as e:  # noqa: BLE001
                print("  ", cfg, "failed", repr(e)[:160])
                continue
            best.append((t, cfg))
        best.sort()
        for t, cfg in best[:5]:
            row("kn gemv", t, list(cfg))
        for rr in rows:
            if rr["shape"] == f"{n}x{k}":
                print(f"  {rr['kernel']:26s} {rr['shape']:>11s} {str(rr['config']):18s} {rr['ms'] * 1e3:7.1f} us "
                      f"{rr['pct_copy_ceiling']:5.1f}% {rr['speedup_vs_bf16']:5.2f}x", flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gemv-kn-probe.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "copy_ceiling_tb_s": ceil / 1e12, "check_failures": bad,
             "check_worst": worst, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
