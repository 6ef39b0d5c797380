"""Weight-only matmul kernels: correctness against the reference on fresh random shapes, then
timings against bf16 cuBLAS (and torchao int4 / bitsandbytes NF4 when importable), with the copy
ceiling measured in the same run.

  python bench/kernels.py --out bench/results            # GPU: the full table
  python bench/kernels.py --cpu --out bench/results      # CPU: PyTorch's int4 / int8 kernels vs fp32 / bf16

Timing: each variant is captured as a CUDA graph of R calls on R different weight copies (more
bytes than the L2 cache holds, so every call reads its weight from HBM), replayed, median of
the replays divided by R. Percent of the copy ceiling counts the bytes the kernel must read
for the weight (codes + scales + zero points) over that time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmpress.kernels import layout  # noqa: E402
from llmpress.quant import nf4  # noqa: E402
from llmpress.quant.primitives import QuantizedWeight, QuantScheme  # noqa: E402
from llmpress.quant.hqq import HQQConfig, hqq  # noqa: E402
from llmpress.quant.rtn import rtn  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N out, K in): square, up/gate, down
MS = [1, 2, 4, 8, 16, 32, 64]


def make_qw(w: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    qw = rtn(w, scheme)
    qw.scale = qw.scale.to(torch.bfloat16)
    return qw


def make_q(w: torch.Tensor, scheme: QuantScheme | str):
    """A weight for the checks: RTN for a scheme, "nf4" (block 64), or "hqq" (4-bit g64 with
    float zero points, the ``w4a16-hqq`` preset's form)."""
    if scheme == "nf4":
        return nf4.quantize_4bit(w, "nf4", 64, True)
    if scheme == "hqq":
        return hqq(w, QuantScheme(4, False, "group", 64), HQQConfig(int_zero=False))
    return make_qw(w, scheme)


def copy_ceiling(dev) -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second."""
    a = torch.empty(2**30, dtype=torch.uint8, device=dev).random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    return 2 * a.numel() / statistics.median(ts)


def graph_time(fns: list, reps: int = 30) -> float:
    """Median seconds per call of a CUDA graph that calls each of ``fns`` once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    return statistics.median(ts) / len(fns)


def check(dev, n_cases: int = 40, seed: int = 0) -> list[dict]:
    """Fresh random shapes (ragged ones included), schemes and M; kernel vs reference."""
    from llmpress.kernels.triton_wa16 import matmul

    g = torch.Generator().manual_seed(seed)
    schemes = [QuantScheme(4, True, "group", 128), QuantScheme(4, False, "group", 128), QuantScheme(4, True, "group", 32),
               QuantScheme(4, False, "group", 64), QuantScheme(4, True, "channel"), QuantScheme(8, True, "channel"),
               QuantScheme(8, False, "group", 128), QuantScheme(3, False, "group", 64), QuantScheme(2, False, "group", 64),
               QuantScheme(4, False, "group", 256),
               "nf4", "hqq"]
    rows = []
    for i in range(n_cases):
        sch = schemes[i % len(schemes)]
        gs = 64 if isinstance(sch, str) else (sch.group_size if sch.strategy == "group" else 8)
        n = int(torch.randint(1, 40, (1,), generator=g)) * 37 + int(torch.randint(0, 16, (1,), generator=g))
        k = gs * int(torch.randint(1, 48, (1,), generator=g)) if gs > 8 else 8 * int(torch.randint(3, 700, (1,), generator=g))
        m = (int(torch.randint(1, 200, (1,), generator=g)) if i % 3 == 0 else 1 if i % 3 == 1
             else int(torch.randint(2, 17, (1,), generator=g)))
        w = torch.randn(n, k, generator=g)
        q = make_q(w, sch)
        desc = {"nf4": "nf4 b64", "hqq": "hqq int4 g64 float zero"}[sch] if isinstance(sch, str) else sch.describe()
        p = layout.pack(q, torch.bfloat16).to(dev)
        x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
        if i % 7 == 3:  # large activations: the packed-half GEMVs' fp16 sums would overflow without their guard
            x = x * 3000
        b = torch.randn(n, generator=g).to(dev, torch.bfloat16) if i % 2 else None
        ref = layout.reference_matmul(x.float(), layout.pack(q, torch.float32).to(dev), None if b is None else b.float())
        from llmpress.kernels.triton_wa16 import _CONFIGS, _GEMV_CONFIGS, _KN_CONFIGS, _kn_fits, _slices

        if p.kmajor:  # 4-bit integer codes: the K-major GEMV's configurations
            gemv_all = [c for c in _KN_CONFIGS if _kn_fits(c[1], c[2], p.group_size, p.k, p.qw.shape[0])]
        else:
            gemv_all = [c for c in _GEMV_CONFIGS if _slices(p.bits, p.group_size, p.k, c[1])]

        fixed = i % 4 != 0  # fixed configurations (each must be right), and the autotuned choice
        gcfg = gemv_all[i % len(gemv_all)] if fixed and m == 1 and i % 2 else None
        cfg = _CONFIGS[i % len(_CONFIGS)] if fixed and gcfg is None else None
        y = matmul(x, p, b, config=cfg, gemv_config=gcfg)
        err = float(((y.float() - ref).norm() / ref.norm()).item())
        ok = bool(torch.isfinite(y).all()) and err < 1e-2
        rows.append({"kernel": "wa16", "scheme": desc, "shape": [n, k], "M": m, "rel_err": err, "ok": ok,
                     "layout": "k-major" if p.kmajor else "n-major", "x_scale": 3000 if i % 7 == 3 else 1})
    return rows


def gpu(args) -> dict:
    from llmpress.kernels.triton_wa16 import matmul

    dev = torch.device("cuda")
    ceil = copy_ceiling(dev)
    print(f"copy ceiling {ceil / 1e12:.2f} TB/s (read + write) on {torch.cuda.get_device_name()}", flush=True)
    checks = check(dev, args.checks)
    bad = [r for r in checks if not r["ok"]]
    print(f"correctness: {len(checks) - len(bad)}/{len(checks)} cases within 1e-2 (worst {max((r['rel_err'] for r in checks), default=0.0):.2e})", flush=True)
    for r in bad:
        print("  FAIL", r)
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001
        quantize_ = None
        print("torchao not importable:", repr(e)[:200])
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001
        bnb = None
        print("bitsandbytes not importable:", repr(e)[:200])

    rows = []
    variants = [("w4a16 g128 sym", QuantScheme(4, True, "group", 128)), ("w4a16 g128 asym", QuantScheme(4, False, "group", 128)),
                ("w8a16 channel", QuantScheme(8, True, "channel")),
                ("nf4 b64", "nf4")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    for n, k in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev) * 0.02
        r_copies = max(4, int(200e6 // (n * k * 2)) + 1)  # > 200 MB of bf16 weights per graph
        wb = [w.to(torch.bfloat16).clone() for _ in range(r_copies)]
        packed = {}
        for name, sch in variants:
            q = nf4.quantize_4bit(w.float(), "nf4", 64, True) if sch == "nf4" else make_qw(w.float(), sch)
            p = layout.pack(q, torch.bfloat16)
            packed[name] = [p] + [p.clone() for _ in range(r_copies - 1)]
        tao = bnbw = None
        if quantize_ is not None:
            try:
                tao = []
                for i in range(min(r_copies, 8)):
                    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
                    lin.weight.data.copy_(wb[i])
                    quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
                    tao.append(lin)
            except Exception as e:  # noqa: BLE001
                print("torchao int4 failed:", repr(e)[:300])
                tao = None
        if bnb is not None:
            try:
                bnbw = []
                for i in range(min(r_copies, 8)):
                    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
                    lin.weight = bnb.nn.Params4bit(wb[i].cpu(), requires_grad=False, quant_type="nf4")
                    bnbw.append(lin.to(dev))
            except Exception as e:  # noqa: BLE001
                print("bitsandbytes nf4 failed:", repr(e)[:300])
                bnbw = None
        for m in ms + ([512, 2048] if args.prefill else []):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t_bf16 = graph_time([lambda W=W: F.linear(x, W) for W in wb])
            base = {"shape": f"{n}x{k}", "N": n, "K": k, "M": m}
            first = len(rows)
            rows.append({**base, "kernel": "bf16 cuBLAS", "ms": t_bf16 * 1e3, "weight_bytes": n * k * 2,
                         "pct_copy_ceiling": 100 * n * k * 2 / t_bf16 / ceil, "speedup_vs_bf16": 1.0})
            for name, _ in variants:
                ps = packed[name]
                matmul(x, ps[0])  # autotune outside the graph
                t = graph_time([lambda P=P: matmul(x, P) for P in ps])
                rows.append({**base, "kernel": f"llmpress {name}", "ms": t * 1e3, "weight_bytes": ps[0].nbytes,
                             "pct_copy_ceiling": 100 * ps[0].nbytes / t / ceil, "speedup_vs_bf16": t_bf16 / t})
                if m == 1 and name == variants[0][0] and args.m1_ablate:  # the K-major GEMV's options
                    from llmpress.kernels import triton_wa16 as tw

                    ov, pdl = tw.KN_OVERFLOW, tw.GEMV_PDL
                    alts = [(f"{'check' if ov == 'xscale' else 'xscale'} guard", "check" if ov == "xscale" else "xscale", pdl)]
                    if tw._PDL_SUPPORTED:
                        alts.append(("PDL" if not pdl else "no PDL", ov, not pdl))
                    for label, o, pd in alts:
                        tw.KN_OVERFLOW, tw.GEMV_PDL = o, pd
                        matmul(x, ps[0])
                        t = graph_time([lambda P=P: matmul(x, P) for P in ps])
                        rows.append({**base, "kernel": f"llmpress {name}, {label}", "ms": t * 1e3,
                                     "weight_bytes": ps[0].nbytes, "pct_copy_ceiling": 100 * ps[0].nbytes / t / ceil,
                                     "speedup_vs_bf16": t_bf16 / t})
                    tw.KN_OVERFLOW, tw.GEMV_PDL = ov, pdl
            for label, mods in (("torchao int4 g128", tao), ("bitsandbytes nf4", bnbw)):
                if not mods:
                    continue
                try:
                    t = graph_time([lambda L=L: L(x) for L in mods])
                    nb = n * k // 2 + n * k // (128 if "torchao" in label else 64) * 4
                    rows.append({**base, "kernel": label, "ms": t * 1e3, "weight_bytes": nb,
                                 "pct_copy_ceiling": 100 * nb / t / ceil, "speedup_vs_bf16": t_bf16 / t})
                except Exception as e:  # noqa: BLE001
                    print(f"{label} timing failed at M={m}:", repr(e)[:200])
            for r in rows[first:]:
                print(f"  {r['kernel']:24s} {r['shape']:>11s} {r['M']:5d} {r['ms'] * 1e3:8.1f} us {r['pct_copy_ceiling']:6.1f}% "
                      f"{r['speedup_vs_bf16']:6.2f}x", flush=True)
            if args.partial:
                Path(args.partial).write_text(json.dumps({"copy_ceiling_tb_s": ceil / 1e12, "checks": checks, "rows": rows}))
    from llmpress.kernels import triton_wa16 as tw

    chosen = {f"{name} {k}": str(v) for name, t in (("gemv kn", tw._gemv_kn_tuned), ("gemv", tw._gemv_tuned),
                                                                 ("mma", tw._tuned))
              for k, v in getattr(t, "cache", {}).items()}
    print("autotuned:", json.dumps(chosen, indent=0)[:3000])
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_ceiling_tb_s": ceil / 1e12,
            "checks": checks, "rows": rows, "autotuned": chosen}


def cpu(args) -> dict:
    from llmpress.kernels import cpu as ck

    torch.manual_seed(0)
    rows = []

    def t_of(f, n=20):
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n

    for n, k in [(1536, 576), (576, 1536), (4096, 4096)]:
        w = torch.randn(n, k) * 0.02
        p4 = ck.pack_cpu(make_qw(w, QuantScheme(4, True, "group", 64)), torch.bfloat16)
        p8 = ck.pack_cpu(make_qw(w, QuantScheme(8, True, "channel")), torch.bfloat16)
        wb = w.bfloat16()
        for m in (1, 16, 128):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            t32 = t_of(lambda: F.linear(x, w))
            tb = t_of(lambda: F.linear(xb, wb))
            t4 = t_of(lambda: ck.matmul(xb, p4))
            t8 = t_of(lambda: ck.matmul(xb, p8))
            for name, t in (("fp32 dense", t32), ("bf16 dense", tb), ("int4 g64 (bf16 act)", t4), ("int8 channel (bf16 act)", t8)):
                rows.append({"kernel": name, "shape": f"{n}x{k}", "M": m, "speedup_vs_fp32": t32 / t})
    return {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--checks", type=int, default=40)
    ap.add_argument("--prefill", action="store_true", help="also time M = 512 and 2048")
    ap.add_argument("--shapes", help="comma-separated NxK subset of the default shapes")
    ap.add_argument("--ms", help="comma-separated M values (default 1,2,4,8,16,32,64)")
    ap.add_argument("--m1-ablate", action="store_true",
                    help="M = 1, W4 g128 sym: also the other fp16-overflow guard and PDL on / off")
    ap.add_argument("--partial", help="rewrite this JSON after every M (a run cut short keeps its rows)")
    args = ap.parse_args()
    res = cpu(args) if args.cpu else gpu(args)
    out = Path(args.out) / ("cpu-kernels.json" if args.cpu else "gpu-kernels.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if args.cpu:
        print(f"{'kernel':26s} {'shape':>10s} {'M':>4s} {'x fp32':>7s}")
        for r in res["rows"]:
            print(f"{r['kernel']:26s} {r['shape']:>10s} {r['M']:4d} {r['speedup_vs_fp32']:7.2f}")
        return
    print(f"{'kernel':24s} {'shape':>11s} {'M':>5s} {'us':>8s} {'%ceil':>6s} {'x bf16':>7s}")
    for r in res["rows"]:
        print(f"{r['kernel']:24s} {r['shape']:>11s} {r['M']:5d} {r['ms'] * 1e3:8.1f} {r['pct_copy_ceiling']:6.1f} {r['speedup_vs_bf16']:7.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
