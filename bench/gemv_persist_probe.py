"""Experiment: a persistent M = 1 GEMV. The v9 kernel (``triton_wa16._gemv_kernel``) gives each
program one column tile and 4-8 steps along K, so a quarter or more of every program is an
unoverlapped first load. Here a fixed grid of programs (a few per SM) walks a flat sequence of
(tile, step) pairs, and the prefetch of the next pair's words runs across tile boundaries: one
pipeline per program from its first tile to its last. Same decode as v9 (EVEN shapes, integer
codes, SPLIT_K = 1). Checks against the reference, then times it against v9's autotuned path and
bf16 cuBLAS on the three Llama-3-8B shapes.

    python bench/gemv_persist_probe.py --out DIR
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

_gp = importlib.util.spec_from_file_location("gemv_probe", os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemv_probe.py"))
gemv_probe = importlib.util.module_from_spec(_gp)
_gp.loader.exec_module(gemv_probe)
_packed_copies, _shape_weights = gemv_probe._packed_copies, gemv_probe._shape_weights
SHAPES, copy_ceiling, graph_time, make_qw = (gemv_probe.SHAPES, gemv_probe.copy_ceiling, gemv_probe.graph_time,
                                             gemv_probe.make_qw)  # bench/kernels.py, as gemv_probe loaded it

from llmpress.kernels import layout  # noqa: E402
from llmpress.kernels import triton_wa16 as tw  # noqa: E402
from llmpress.kernels.triton_wa16 import _gemv_loads, _int_step  # noqa: E402
from llmpress.quant.primitives import QuantScheme  # noqa: E402


@triton.jit
def _gemv_persist_kernel(
    X, QW, S, Z, O,
    N, K, KW, G, GS, stride_qn, stride_sn, code_mask, n_prog,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, WPG: tl.constexpr,
):
    pid = tl.program_id(0)
    PER: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = NG * WPG * PER
    steps = K // BLOCK_K
    n_tiles = N // BLOCK_N
    mine = (n_tiles - pid + n_prog - 1) // n_prog  # tiles pid, pid + n_prog, ...
    total = mine * steps
    rw = tl.arange(0, NG)[:, None] * WPG + tl.arange(0, WPG)[None, :]
    kw = rw * PER
    lane = tl.arange(0, BLOCK_N)
    n_ok = lane < BLOCK_N  # EVEN: every column exists
    offs_n = pid * BLOCK_N + lane
    p_nx, s_nx, z_nx = _gemv_loads(QW + offs_n[:, None, None] * stride_qn, S, Z, offs_n[:, None] * stride_sn, 0, rw,
                                   n_ok, KW, G, GS, PER, WPG, NG, False, True)
    acc = tl.zeros((BLOCK_N, NG, WPG), dtype=tl.float32)
    for it in range(0, total):
        tile = pid + (it // steps) * n_prog
        k0 = (it % steps) * BLOCK_K
        nx = tl.minimum(it + 1, total - 1)
        n_nx = (pid + (nx // steps) * n_prog) * BLOCK_N + lane
        p = p_nx
        s = s_nx.to(tl.float32)
        z = z_nx.to(tl.float32)
        p_nx, s_nx, z_nx = _gemv_loads(QW + n_nx[:, None, None] * stride_qn, S, Z, n_nx[:, None] * stride_sn,
                                       (nx % steps) * BLOCK_K, rw, n_ok, KW, G, GS, PER, WPG, NG, False, True)
        acc += _int_step(p, s, z, X, k0, kw, K, code_mask, BITS, True)
        if it % steps == steps - 1:
            row = tl.sum(tl.sum(acc, axis=2), axis=1)
            tl.store(O + tile * BLOCK_N + lane, row.to(O.dtype.element_ty))
            acc = tl.zeros((BLOCK_N, NG, WPG), dtype=tl.float32)


def persist_matmul(x: torch.Tensor, p: layout.PackedWeight, cfg: tuple) -> torch.Tensor:
    """cfg: (BLOCK_N, words per step, warps, programs per SM)."""
    bn, words, warps, per_sm = cfg
    sl = tw._slices(p.bits, p.group_size, p.k, words)
    assert sl is not None and p.n % bn == 0 and p.k % (words * p.per_word) == 0, cfg
    out = torch.empty(1, p.n, device=x.device, dtype=x.dtype)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    n_prog = min(p.n // bn, sms * per_sm)
    gs = p.group_size if p.group_size < p.k else p.qw.shape[1] * p.per_word
    _gemv_persist_kernel[(n_prog,)](x, p.qw, p.scale, p.zero if p.zero is not None else p.scale, out,
                                    p.n, p.k, p.qw.shape[1], p.scale.shape[1], gs, p.qw.stride(0), p.scale.stride(0),
                                    (1 << p.bits) - 1, n_prog, BITS=p.bits, BLOCK_N=bn, NG=sl[0], WPG=sl[1],
                                    num_warps=warps, num_stages=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    dev = torch.device("cuda")
    ceil = copy_ceiling(dev)
    print(f"copy ceiling {ceil / 1e12:.2f} TB/s on {torch.cuda.get_device_name()}", flush=True)
    cfgs = [(bn, wd, w, ps) for bn, wd, w, ps in itertools.product((8, 16, 32), (64, 128), (4, 8), (1, 2, 4, 8))
            if bn * wd <= 32 * 32 * w]
    g = torch.Generator().manual_seed(3)
    bad = 0
    for sch, n, k in ((QuantScheme(4, True, "group", 128), 512, 1024), (QuantScheme(4, False, "group", 64), 1024, 2048),
                      (QuantScheme(8, True, "channel"), 768, 1536)):
        w = torch.randn(n, k, generator=g)
        q = make_qw(w, sch)
        p = layout.pack(q, torch.bfloat16, kmajor=False).to(dev)
        ref = layout.reference_matmul(torch.randn(1, k, generator=g).to(dev), layout.pack(q, torch.float32, kmajor=False).to(dev))
        x = None
        for cfg in cfgs[::3]:
            if tw._slices(p.bits, p.group_size, p.k, cfg[1]) is None or k % (cfg[1] * p.per_word):
                continue
            g2 = torch.Generator().manual_seed(3 + n)
            xx = torch.randn(1, k, generator=g2).to(dev)
            ref = layout.reference_matmul(xx, layout.pack(q, torch.float32, kmajor=False).to(dev))
            y = persist_matmul(xx.to(torch.bfloat16), p, cfg)
            err = float((y.float() - ref).norm() / ref.norm())
            if not err < 1e-2:
                bad += 1
                print("  FAIL", sch.describe(), n, k, cfg, err, flush=True)
    print(f"correctness: {bad} failures", flush=True)
    rows = []
    for sname, sch in (("w4g128sym", QuantScheme(4, True, "group", 128)), ("w8ch", QuantScheme(8, True, "channel"))):
        for n, k in SHAPES:
            w, wb = _shape_weights(dev, n, k)
            r = len(wb)
            p = layout.pack(make_qw(w.float(), sch), torch.bfloat16, kmajor=False)
            ps = _packed_copies(p, r)
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            t_bf = graph_time([lambda W=W: F.linear(x, W) for W in wb])
            tw.matmul(x, ps[0])
            t_v9 = graph_time([lambda P=P: tw.matmul(x, P) for P in ps])
            best = None
            for cfg in cfgs:
                if tw._slices(p.bits, p.group_size, p.k, cfg[1]) is None or k % (cfg[1] * p.per_word) or n % cfg[0]:
                    continue
                try:
                    persist_matmul(x, ps[0], cfg)
                    t = graph_time([lambda P=P: persist_matmul(x, P, cfg) for P in ps], reps=15)
                except Exception as e:  # noqa: BLE001
                    print("  ", cfg, "failed:", repr(e)[:160], flush=True)
                    continue
                rows.append({"shape": f"{n}x{k}", "scheme": sname, "config": cfg, "us": t * 1e6,
                             "pct_copy_ceiling": 100 * p.nbytes / t / ceil, "speedup_vs_bf16": t_bf / t})
                if best is None or t < best[1]:
                    best = (cfg, t)
            rows.append({"shape": f"{n}x{k}", "scheme": sname, "config": "v9 autotuned", "us": t_v9 * 1e6,
                         "pct_copy_ceiling": 100 * p.nbytes / t_v9 / ceil, "speedup_vs_bf16": t_bf / t_v9})
            rows.append({"shape": f"{n}x{k}", "scheme": sname, "config": "bf16 cuBLAS", "us": t_bf * 1e6})
            print(f"{n}x{k} {sname}: bf16 {t_bf * 1e6:.1f} us | v9 {t_v9 * 1e6:.1f} ({100 * p.nbytes / t_v9 / ceil:.1f}%) | "
                  f"persistent best {best[1] * 1e6:.1f} ({100 * p.nbytes / best[1] / ceil:.1f}%) {best[0]}", flush=True)
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / "gemv-persist-probe.json").write_text(json.dumps(
                {"device": torch.cuda.get_device_name(), "copy_ceiling_tb_s": ceil / 1e12, "rows": rows}))


if __name__ == "__main__":
    main()
