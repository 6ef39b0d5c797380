"""Configuration sweep of the M = 1 kernel (``triton_wa16._gemv_kernel``) against the
autotuned path and bf16 cuBLAS (H100): correctness of every configuration class on ragged
shapes, then µs per call and % of the copy ceiling for each configuration on the three
Llama-3-8B shapes. Prints the best three per shape and writes ``gemv-probe.json``; the fastest
configurations are the autotuner's list (``_GEMV_CONFIGS``).

    python bench/gemv_probe.py --out DIR [--quick] [--schemes w4g128sym,w8ch]
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.py"))
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)
SHAPES = bench_kernels.SHAPES
copy_ceiling = bench_kernels.copy_ceiling
graph_time = bench_kernels.graph_time
make_q = bench_kernels.make_q
make_qw = bench_kernels.make_qw

from llmpress.kernels import layout  # noqa: E402
from llmpress.kernels import triton_wa16 as tw  # noqa: E402
from llmpress.quant import nf4  # noqa: E402
from llmpress.quant.primitives import QuantScheme  # noqa: E402


def configs(quick: bool, wide: bool = False) -> list[tuple]:
    """(BLOCK_N, words per step, SPLIT_K, warps, prefetch), at most 32 words per thread; ``wide``:
    prefetching tiles of 8-128 columns only."""
    out = []
    if wide:
        for bn, wd, sk, w in itertools.product((8, 16, 32, 64, 128), (32, 64, 128), (1, 2, 4), (4, 8)):
            if bn * wd <= 32 * 32 * w:
                out.append((bn, wd, sk, w, True))
        return out
    words = (32, 64, 128) if not quick else (32, 64)
    for bn, wd, sk, w, pf in itertools.product((8, 16, 32, 64), words, (1, 2, 4, 8, 16), (4, 8), (False, True)):
        if bn * wd <= 32 * 32 * w and not (quick and w == 8):
            out.append((bn, wd, sk, w, pf))
    return out


def check(dev, cases: int = 36) -> tuple[int, int, float]:
    g = torch.Generator().manual_seed(1)
    worst, n_ok, n_all = 0.0, 0, 0

    def score(y, ref, *what) -> None:
        nonlocal worst, n_ok, n_all
        err = float(((y.float() - ref).norm() / ref.norm()).item())
        worst = max(worst, err)
        n_all += 1
        good = bool(torch.isfinite(y).all()) and err < 1e-2
        n_ok += good
        if not good:
            print("  FAIL", *what, err, flush=True)

    schemes = [QuantScheme(4, True, "group", 128), QuantScheme(4, False, "group", 64), QuantScheme(8, True, "channel"),
               QuantScheme(3, False, "group", 64), QuantScheme(4, True, "channel"), "nf4", "hqq"]
    for i in range(cases):
        sch = schemes[i % len(schemes)]
        gs = 64 if isinstance(sch, str) else (sch.group_size if sch.strategy == "group" else 8)
        n = int(torch.randint(1, 60, (1,), generator=g)) * 37 + int(torch.randint(0, 16, (1,), generator=g))
        k = gs * int(torch.randint(1, 48, (1,), generator=g)) if gs > 8 else 8 * int(torch.randint(3, 700, (1,), generator=g))
        w = torch.randn(n, k, generator=g)
        q = make_q(w, sch)
        p = layout.pack(q, torch.bfloat16, kmajor=False).to(dev)
        x = torch.randn(1, k, generator=g).to(dev, torch.bfloat16)
        b = torch.randn(n, generator=g).to(dev, torch.bfloat16) if i % 2 else None
        ref = layout.reference_matmul(x.float(), layout.pack(q, torch.float32, kmajor=False).to(dev), None if b is None else b.float())
        for cfg in configs(True)[i % 5 :: 7]:
            if tw._slices(p.bits, p.group_size, p.k, cfg[1]) is None:
                continue
            score(tw.matmul(x, p, b, gemv_config=cfg), ref, sch if isinstance(sch, str) else sch.describe(), n, k, cfg)
    # activations in the thousands: the packed-half path's fp16 sums overflow and the programs
    # that saw it must redo their share in float32 (a wrong or infinite result fails here)
    for scale in (1e3, 3e4):
        w = torch.randn(4096, 4096, generator=g)
        q = make_q(w, QuantScheme(4, True, "group", 128))
        p = layout.pack(q, torch.bfloat16, kmajor=False).to(dev)
        x = (torch.randn(1, 4096, generator=g) * scale).to(dev, torch.bfloat16)
        ref = layout.reference_matmul(x.float(), layout.pack(q, torch.float32, kmajor=False).to(dev), None)
        for cfg in ((16, 128, 1, 4, True), (32, 64, 4, 4, True)):
            score(tw.matmul(x, p, None, gemv_config=cfg), ref, "large x", scale, cfg)
    return n_ok, n_all, worst


def _shape_weights(dev, n: int, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A seeded [n, k] weight and enough bf16 copies (> 200 MB) that every timed call reads HBM."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device=dev) * 0.02
    r = max(4, int(200e6 // (n * k * 2)) + 1)
    return w, [w.to(torch.bfloat16).clone() for _ in range(r)]


def _packed_copies(p: layout.PackedWeight, r: int) -> list[layout.PackedWeight]:
    """``p`` and r - 1 copies of its tensors, so that timed calls read HBM, not L2."""
    return [p] + [p.clone() for _ in range(r - 1)]


def tc_sweep(dev, ceil: float, out: Path, tag: str) -> None:
    """M = 2..16, W4 g128: the tensor-core kernel's configurations (BLOCK_N, BLOCK_K, SPLIT_K,
    warps, stages) against its autotuned choice and bf16 cuBLAS, per shape and M."""
    cfgs = [(bn, bk, sk, 4, st) for bn in (16, 32, 64, 128) for bk in (64, 128) for sk in (1, 2, 4, 8, 16) for st in (2, 4)]
    rows = []
    for n, k in SHAPES:
        w, wb = _shape_weights(dev, n, k)
        r = len(wb)
        p = layout.pack(make_qw(w.float(), QuantScheme(4, True, "group", 128)), torch.bfloat16, kmajor=False)
        ps = _packed_copies(p, r)
        for m in (2, 8, 16):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t_bf = graph_time([lambda W=W: F.linear(x, W) for W in wb])
            tw.matmul(x, ps[0])
            t_auto = graph_time([lambda P=P: tw.matmul(x, P) for P in ps])
            best = None
            for cfg in cfgs:
                try:
                    tw.matmul(x, ps[0], config=cfg)
                    t = graph_time([lambda P=P: tw.matmul(x, P, config=cfg) for P in ps], reps=15)
                except Exception as e:  # noqa: BLE001
                    print("  ", cfg, "failed:", repr(e)[:120], flush=True)
                    continue
                rows.append({"shape": f"{n}x{k}", "M": m, "config": cfg, "us": t * 1e6, "speedup_vs_bf16": t_bf / t})
                if best is None or t < best[1]:
                    best = (cfg, t)
            rows.append({"shape": f"{n}x{k}", "M": m, "config": "autotuned", "us": t_auto * 1e6, "bf16_us": t_bf * 1e6})
            print(f"{n}x{k} M={m:2d}: bf16 {t_bf * 1e6:5.1f} us | autotuned {t_auto * 1e6:5.1f} ({t_bf / t_auto:.2f}x) | "
                  f"best {best[1] * 1e6:5.1f} ({t_bf / best[1]:.2f}x) {best[0]}", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"tc-sweep{tag}.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))
    by = {}
    for r in rows:
        if r["config"] != "autotuned":
            by.setdefault(tuple(r["config"]), []).append(r["speedup_vs_bf16"])
    top = sorted(by.items(), key=lambda kv: -min(kv[1]))[:8]
    print("configurations by their worst speedup over all shapes and M:", [(c, round(min(v), 2)) for c, v in top])


def ab(dev, ceil: float, out: Path, tag: str) -> None:
    """Same-run A/B of the GEMV's variants, W4 g128 symmetric: the float32 path against the
    packed-half path (``GEMV_F16X2``) on the same configurations; each variant's result is
    checked against the reference first. (``gemv-ab-f16x2.json`` also has rows prefetching two
    steps ahead, a kernel option of commit e1ba89b that measured no faster and was removed.)"""
    cfgs = [(8, 128, 1, 8), (16, 128, 1, 4), (16, 128, 1, 8), (32, 128, 2, 4), (64, 64, 4, 4), (128, 32, 2, 4),
            (64, 128, 2, 4), (16, 64, 4, 4), (32, 64, 1, 4)]
    rows = []
    for n, k in SHAPES:
        w, wb = _shape_weights(dev, n, k)
        q = make_qw(w.float(), QuantScheme(4, True, "group", 128))
        p = layout.pack(q, torch.bfloat16, kmajor=False)
        ps = _packed_copies(p, len(wb))
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = layout.reference_matmul(x.float(), layout.pack(q, torch.float32, kmajor=False).to(dev), None)
        t_bf = graph_time([lambda W=W: F.linear(x, W) for W in wb])
        best = {}
        for c in cfgs:
            for half in (False, True):
                for pf in (1,):
                    cfg = (*c, pf)
                    tw.GEMV_F16X2 = half
                    y = tw.matmul(x, ps[0], None, gemv_config=cfg)
                    err = float(((y.float() - ref).norm() / ref.norm()).item())
                    t = graph_time([lambda P=P: tw.matmul(x, P, None, gemv_config=cfg) for P in ps], reps=15)
                    v = f"{'f16x2' if half else 'fp32'} prefetch {pf}"
                    rows.append({"shape": f"{n}x{k}", "variant": v, "config": cfg, "us": t * 1e6, "err": err,
                                 "pct_copy_ceiling": 100 * p.nbytes / t / ceil, "speedup_vs_bf16": t_bf / t})
                    if err > 1e-2:
                        print("  FAIL", n, k, v, cfg, err, flush=True)
                    if v not in best or t < best[v][1]:
                        best[v] = (cfg, t)
        tw.GEMV_F16X2 = True
        print(f"{n}x{k}: bf16 {t_bf * 1e6:.1f} us | " + " | ".join(
            f"{v} {t * 1e6:.1f} us ({100 * p.nbytes / t / ceil:.1f}%) {cfg}" for v, (cfg, t) in best.items()), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"gemv-ab{tag}.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                            "copy_ceiling_tb_s": ceil / 1e12, "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--schemes", default="w4g128sym,w4g128asym")
    ap.add_argument("--wide", action="store_true", help="the wide-tile configuration set")
    ap.add_argument("--module", default="llmpress.kernels.triton_wa16",
                    help="module with the kernel to sweep (e.g. a saved earlier version, for a same-run comparison)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--checks", type=int, default=36, help="random shapes in the correctness check")
    ap.add_argument("--no-sweep", action="store_true", help="only the autotuned path (and bf16)")
    ap.add_argument("--ab", action="store_true", help="same-run A/B of the GEMV's float32 and packed-half paths, "
                    "then exit")
    ap.add_argument("--tc", action="store_true", help="sweep the tensor-core kernel's configurations at M = 2..16, then exit")
    a = ap.parse_args()
    global tw
    tw = importlib.import_module(a.module)
    dev = torch.device("cuda")
    ceil = copy_ceiling(dev)
    print(f"copy ceiling {ceil / 1e12:.2f} TB/s on {torch.cuda.get_device_name()}", flush=True)
    if a.tc:
        tc_sweep(dev, ceil, Path(a.out), a.tag)
        return
    if a.ab:
        ab(dev, ceil, Path(a.out), a.tag)
        return
    t0 = time.time()
    n_ok, n_all, worst = check(dev, a.checks)
    print(f"gemv correctness: {n_ok}/{n_all} within 1e-2 (worst {worst:.2e}) [{time.time() - t0:.0f}s]", flush=True)
    schemes = {"w4g128sym": QuantScheme(4, True, "group", 128), "w4g128asym": QuantScheme(4, False, "group", 128),
               "w8ch": QuantScheme(8, True, "channel"), "nf4": "nf4"}
    rows = []
    for n, k in SHAPES:
        w, wb = _shape_weights(dev, n, k)
        r = len(wb)
        for sname in a.schemes.split(","):
            sch = schemes[sname]
            q = nf4.quantize_4bit(w.float(), "nf4", 64, True) if sch == "nf4" else make_qw(w.float(), sch)
            p = layout.pack(q, torch.bfloat16, kmajor=False)
            ps = _packed_copies(p, r)
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            t_bf = graph_time([lambda W=W: F.linear(x, W) for W in wb])
            tw.matmul(x, ps[0])
            t_auto = graph_time([lambda P=P: tw.matmul(x, P) for P in ps])
            best = None
            for cfg in ([] if a.no_sweep else configs(a.quick, a.wide)):
                if tw._slices(p.bits, p.group_size, p.k, cfg[1]) is None:
                    continue
                try:
                    tw.matmul(x, ps[0], None, gemv_config=cfg)
                    t = graph_time([lambda P=P: tw.matmul(x, P, None, gemv_config=cfg) for P in ps], reps=15)
                except Exception as e:  # noqa: BLE001
                    print("  ", cfg, "failed:", repr(e)[:160], flush=True)
                    continue
                rows.append({"shape": f"{n}x{k}", "scheme": sname, "M": 1, "kernel": "gemv", "config": cfg,
                             "us": t * 1e6, "pct_copy_ceiling": 100 * p.nbytes / t / ceil, "speedup_vs_bf16": t_bf / t})
                if best is None or t < best[1]:
                    best = (cfg, t)
            line = (f"{n}x{k} {sname:10s}: bf16 {t_bf * 1e6:6.1f} us | autotuned {t_auto * 1e6:6.1f} us "
                    f"({100 * p.nbytes / t_auto / ceil:4.1f}%, {t_bf / t_auto:4.2f}x)")
            if best is not None:
                cfg, t = best
                line += f" | best {t * 1e6:6.1f} us ({100 * p.nbytes / t / ceil:4.1f}%, {t_bf / t:4.2f}x) {cfg}"
            print(line, flush=True)
            rows.append({"shape": f"{n}x{k}", "scheme": sname, "M": 1, "kernel": "bf16 cuBLAS", "config": "-",
                         "us": t_bf * 1e6})
            rows.append({"shape": f"{n}x{k}", "scheme": sname, "M": 1, "kernel": "autotuned", "config": "-",
                         "us": t_auto * 1e6, "pct_copy_ceiling": 100 * p.nbytes / t_auto / ceil,
                         "speedup_vs_bf16": t_bf / t_auto})
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / f"gemv-probe{a.tag}.json").write_text(json.dumps(
                {"device": torch.cuda.get_device_name(), "copy_ceiling_tb_s": ceil / 1e12, "module": a.module,
                 "check": [n_ok, n_all, worst], "rows": rows}))
    for (shape, sname), grp in itertools.groupby(sorted((r for r in rows if r["kernel"] == "gemv"),
                                                        key=lambda r: (r["shape"], r["scheme"], r["us"])),
                                                 key=lambda r: (r["shape"], r["scheme"])):
        print(shape, sname, [(r["config"], round(r["us"], 1)) for r in list(grp)[:3]])

if __name__ == "__main__":
    main()
