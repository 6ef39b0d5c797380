"""Structured shrinking of smollm2-135m (pinned protocol, DESIGN.md §4): a quarter of the
decoder blocks removed (chosen by angular distance, as the closest contiguous run, or the last
ones) and low-rank factorization at 80% of the parameters (plain vs activation-aware SVD);
perplexity, KL, checkpoint size and CPU forward speed against the dense model, in one run.

    python bench/structured.py [--n-windows 24] [--fraction 0.25]

Speed: forward passes of one 1024-token window (batch 1), dense and pruned models interleaved,
median of --reps rounds each, as a ratio dense / pruned. Writes
bench/results/structured-smollm2-135m.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch

import llmpress as lp
from llmpress.eval.report import table

ROOT = Path(__file__).resolve().parents[1]


def _disk_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-windows", type=int, default=24)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--ratio", type=float, default=0.8, help="parameters kept by the low-rank rows")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "out" / "structured"))
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate checkpoints already in --out instead of compressing again (removed blocks are "
                         "recovered by matching weights; compress seconds are not reported)")
    a = ap.parse_args()
    out = Path(a.out)
    torch.manual_seed(0)
    base = lp.load("smollm2-135m")
    tok = base.llmpress_tokenizer
    calib = lp.data.Calibration("wiki", n_samples=64, seqlen=512).tokens(tok)
    if not (a.reuse and (out / "dense" / "config.json").exists()):
        lp.save(base, out / "dense", overwrite=True)
    rows = {"dense": {"name": "dense", "method": "dense", "blocks": len(base.model.layers), "removed": [], "seconds": 0.0,
                      "size_mb": _disk_mb(out / "dense"), "dir": out / "dense"}}
    todo = {f"drop{round(a.fraction * 100)}-{imp}": {"method": "drop_blocks", "fraction": a.fraction, "importance": imp}
            for imp in ("angular", "contiguous", "last")}
    todo.update({f"{m}-{round(a.ratio * 100)}": {"method": m, "ratio": a.ratio} for m in ("svd", "asvd")})
    if not a.reuse:
        todo[f"asvd-{round(a.ratio * 100)}+rtn-w8"] = [{"method": "asvd", "ratio": a.ratio},
                                                       {"method": "rtn", "bits": 8, "group_size": -1}]
    distances = None
    for name, step in todo.items():
        steps = step if isinstance(step, list) else [step]
        r = lp.Recipe.from_dict({"steps": steps}, name=name)
        if a.reuse and (out / name / "config.json").exists():
            m = lp.load(out / name)
            kept = list(range(len(base.model.layers)))
            if steps[0]["method"] == "drop_blocks":
                kept = [next(i for i, b in enumerate(base.model.layers)
                             if torch.equal(b.self_attn.q_proj.weight, x.self_attn.q_proj.weight)) for x in m.model.layers]
            rows[name] = {"name": name, "method": " -> ".join(x.describe() for x in r.steps),
                          "blocks": len(m.model.layers),
                          "removed": [i for i in range(len(base.model.layers)) if i not in kept], "seconds": None,
                          "size_mb": _disk_mb(out / name), "dir": out / name,
                          "command": f"python bench/structured.py --fraction {a.fraction} --ratio {a.ratio}"}
            print(f"{name}: reused, removed {rows[name]['removed']}", flush=True)
            del m
            continue
        m = lp.load("smollm2-135m")
        t0 = time.perf_counter()
        rep = lp.compress(m, r, calib, progress=False)
        sec = time.perf_counter() - t0
        lp.save(m, out / name, overwrite=True)
        st = rep.structure[0] if rep.structure else {"blocks_after": len(m.model.layers), "removed": []}
        rows[name] = {"name": name, "method": " -> ".join(x.describe() for x in r.steps),
                      "blocks": st["blocks_after"], "removed": st["removed"], "seconds": sec,
                      "size_mb": _disk_mb(out / name), "dir": out / name,
                      "command": f"python bench/structured.py --fraction {a.fraction} --ratio {a.ratio}"}
        if "block_distances" in st:
            distances = st["block_distances"]
        print(f"{name}: {rows[name]['method']} in {sec:.1f}s", flush=True)
        del m
        gc.collect()

    models = {k: lp.load(r["dir"]) for k, r in rows.items()}
    ev = lp.evaluate_many({k: v for k, v in models.items() if k != "dense"}, models["dense"], tokenizer=tok,
                          n_windows=a.n_windows, progress=False)
    base_ppl = lp.evaluate(models["dense"], tokenizer=tok, n_windows=a.n_windows, progress=False).ppl
    window = lp.data.eval_windows(tok, n_windows=1)[:, :1024]
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for k, m in models.items():  # warm-up
            m(window)
        for _ in range(a.reps):
            for k, m in models.items():
                t = time.perf_counter()
                m(window)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out_rows = []
    for k, r in rows.items():
        q = {"ppl": base_ppl, "kl": 0.0, "top1": 1.0} if k == "dense" else {
            "ppl": ev[k].ppl, "kl": ev[k].kl, "top1": ev[k].top1}
        out_rows.append({**{x: y for x, y in r.items() if x != "dir"}, **q,
                         "size_vs_dense": r["size_mb"] / rows["dense"]["size_mb"],
                         "forward_speedup": med["dense"] / med[k]})
    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
    meta = {"model": "smollm2-135m", "protocol": f"wiki eval, {a.n_windows}x1024 tokens; calib 64x512 seed 0; fp32 CPU",
            "machine": machine, "date": time.strftime("%Y-%m-%d"), "base_ppl": base_ppl,
            "speed": f"forward of 1x1024 tokens, median of {a.reps} interleaved rounds",
            "block_distances": distances}
    (ROOT / "bench" / "results" / "structured-smollm2-135m.json").write_text(
        json.dumps({**meta, "rows": out_rows}, indent=2, default=str))
    print(f"base ppl {base_ppl:.3f}")
    print(table(out_rows, [("name", "model"), ("method", "method"), ("blocks", "blocks"), ("removed", "removed"), ("ppl", "ppl"),
                           ("kl", "KL"), ("top1", "top-1"), ("size_mb", "size MB"), ("size_vs_dense", "size/dense"),
                           ("forward_speedup", "forward speedup"), ("seconds", "choose s")]))


if __name__ == "__main__":
    main()
