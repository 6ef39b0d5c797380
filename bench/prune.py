"""Pruning side by side on smollm2-135m under the pinned protocol (DESIGN.md §4): llmpress's
magnitude / Wanda / SparseGPT at 50% unstructured and 2:4, SparseGPT 2:4 + GPTQ W4, and
llmcompressor's SparseGPT and Wanda on the same calibration tokens, evaluated in one run.

    python bench/prune.py [--n-windows 24] [--rows a,b] [--peers DIR]

``--peers DIR``: results of ``bench/peers/llmcompressor_run.py DIR/lc CALIB lc-sparsegpt-50,...``
(dense checkpoints + peer.json with seconds). bench/peers/run_prune.sh runs both. Each llmpress
row is compressed here (wall time of ``llmpress.compress``), saved (sparse weights in the bitmask
layout), read back (identical logits checked) and the read-back checkpoint is evaluated. Writes
bench/results/prune-smollm2-135m.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch

import llmpress as lp
from llmpress.eval.report import table

ROOT = Path(__file__).resolve().parents[1]
JOINT = {"name": "2of4-sparsegpt-joint-w4a16", "steps": [
    {"method": "sparsegpt", "pattern": "2:4", "joint": True},
    {"method": "gptq", "bits": 4, "group_size": 64, "observer": "minmax", "act_order": False}]}
ROWS: dict[str, tuple] = {
    "magnitude-50": ("sparse50-magnitude", {}),
    "wanda-50": ("sparse50-wanda", {}),
    "sparsegpt-50": ("sparse50-sparsegpt", {}),
    "wanda-50-owl": ({"name": "sparse50-wanda-owl", "steps": [{"method": "wanda", "sparsity": 0.5, "owl": True}]}, {}),
    "magnitude-2of4": ("2of4-magnitude", {}),
    "wanda-2of4": ("2of4-wanda", {}),
    "sparsegpt-2of4": ("2of4-sparsegpt", {}),
    "sparsegpt-2of4+gptq-w4-g64": ("2of4-sparsegpt-w4a16", {"group_size": 64}),
    "sparsegpt-2of4-joint-w4-g64": (JOINT, {}),
}
PAIRS = {"lc-sparsegpt-50": "sparsegpt-50", "lc-wanda-50": "wanda-50",
         "lc-sparsegpt-2of4": "sparsegpt-2of4", "lc-wanda-2of4": "wanda-2of4"}
# Published Llama-2-7B WikiText2 perplexities (Sun et al. 2023, Table 2/3), context only
LLAMA2_7B = {"dense": 5.12, "magnitude-50": 14.89, "sparsegpt-50": 6.51, "wanda-50": 6.42,
             "magnitude-2of4": 54.59, "sparsegpt-2of4": 10.17, "wanda-2of4": 11.02}


def _recipe(spec, kw) -> lp.Recipe:
    return lp.Recipe.from_dict(spec, name=spec["name"]) if isinstance(spec, dict) else lp.recipe(spec, **kw)


def _disk_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-windows", type=int, default=24)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--peers", default=None)
    ap.add_argument("--out", default=str(ROOT / "out" / "prune"))
    ap.add_argument("--chunk", type=int, default=6)
    ap.add_argument("--tag", default="", help="suffix for the result file (a partial re-run)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = lp.load("smollm2-135m")
    tok = base.llmpress_tokenizer
    calib = lp.data.Calibration("wiki", n_samples=64, seqlen=512).tokens(tok)
    probe = calib[:2, :64]
    lp.save(base, out / "dense", overwrite=True)
    dense_mb = _disk_mb(out / "dense")

    rows: dict[str, dict] = {}
    for name in [r for r in a.rows.split(",") if r]:
        r = _recipe(*ROWS[name])
        m = lp.load("smollm2-135m")
        t0 = time.perf_counter()
        rep = lp.compress(m, r, calib, progress=False)
        sec = time.perf_counter() - t0
        lp.save(m, out / name, overwrite=True)
        back = lp.load(out / name)
        with torch.no_grad():
            exact = torch.equal(back(probe).logits, m(probe).logits)
        sp = [x.get("sparsity") for x in rep.layers]
        pruned = [lay for lay in rep.layers if lay.get("sparsity") is not None]
        sparsity = sum(lay["sparsity"] for lay in pruned) / max(len(pruned), 1)
        rows[name] = {"tool": "llmpress", "name": name, "recipe": r.name,
                      "method": " -> ".join(s.describe() for s in r.steps), "sparsity": round(sparsity, 4),
                      "seconds": sec, "peak_rss_mb": rep.peak_rss_mb, "reload_exact": exact, "dir": out / name,
                      "size_mb": _disk_mb(out / name), "command": f"python bench/prune.py --rows {name}"}
        print(f"{name}: {sec:.1f}s sparsity {sparsity:.3f} size {rows[name]['size_mb']:.1f} MB exact={exact}",
              flush=True)
        del m, back, sp
        gc.collect()

    peers = {}
    if a.peers:
        for d in sorted(Path(a.peers).rglob("peer.json")):
            info = json.loads(d.read_text())
            if d.parent.name in PAIRS:
                peers[d.parent.name] = {"dir": d.parent, **info}

    todo = [(k, rows[k]["dir"]) for k in rows] + [(k, v["dir"]) for k, v in peers.items() if "error" not in v]
    results = {}
    for i in range(0, len(todo), a.chunk):
        chunk = todo[i : i + a.chunk]
        models = {k: lp.load(d) for k, d in chunk}
        ev = lp.evaluate_many(models, base, tokenizer=tok, n_windows=a.n_windows, progress=False)
        for k, _ in chunk:
            results[k] = {"ppl": ev[k].ppl, "kl": ev[k].kl, "top1": ev[k].top1}
            print(f"eval {k}: ppl {ev[k].ppl:.3f} kl {ev[k].kl:.4f}", flush=True)
        del models, ev
        gc.collect()
    base_ppl = lp.evaluate(base, tokenizer=tok, n_windows=a.n_windows, progress=False).ppl

    out_rows = []
    for k, r in rows.items():
        out_rows.append({**{x: y for x, y in r.items() if x != "dir"}, **results[k],
                         "delta_ppl": results[k]["ppl"] - base_ppl,
                         "size_vs_dense": r["size_mb"] / dense_mb})
    for k, v in peers.items():
        row = {"tool": v["tool"], "version": v.get("version"), "name": k, "method": v["method"],
               "sparsity": v.get("sparsity"), "seconds": v.get("seconds"), "error": v.get("error"),
               "size_mb": _disk_mb(v["dir"]) if "error" not in v else None, **results.get(k, {})}
        if "ppl" in row:
            row["delta_ppl"] = row["ppl"] - base_ppl
        ours = PAIRS[k]
        if ours in rows and "kl" in row:
            row.update(llmpress_row=ours, llmpress_kl=results[ours]["kl"],
                       kl_no_worse=results[ours]["kl"] <= row["kl"],
                       time_ratio=rows[ours]["seconds"] / v["seconds"] if v.get("seconds") else None)
        out_rows.append(row)

    def inc(k):
        return results[k]["ppl"] - base_ppl if k in results else None

    checks = {}
    for pat in ("50", "2of4"):
        mg, wd, sg = inc(f"magnitude-{pat}"), inc(f"wanda-{pat}"), inc(f"sparsegpt-{pat}")
        if None not in (mg, wd, sg):
            checks[pat] = {"wanda_over_magnitude": wd / mg, "sparsegpt_over_wanda": sg / wd,
                           "sparsegpt_over_magnitude": sg / mg}
    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
    meta = {"model": "smollm2-135m", "protocol": f"wiki eval, {a.n_windows}x1024 tokens; calib 64x512 seed 0; fp32 CPU",
            "machine": machine, "date": time.strftime("%Y-%m-%d"), "base_ppl": base_ppl, "dense_size_mb": dense_mb,
            "ppl_increase_ratios": checks, "llama2_7b_published": LLAMA2_7B}
    (ROOT / "bench" / "results" / f"prune-smollm2-135m{a.tag}.json").write_text(
        json.dumps({**meta, "rows": out_rows}, indent=2, default=str))
    print(f"base ppl {base_ppl:.3f}; dense checkpoint {dense_mb:.1f} MB")
    cols = [("tool", "tool"), ("name", "row"), ("sparsity", "sparsity"), ("ppl", "ppl"), ("delta_ppl", "Δppl"),
            ("kl", "KL"), ("top1", "top-1"), ("size_mb", "size MB"), ("seconds", "prune s"),
            ("llmpress_kl", "llmpress KL"), ("kl_no_worse", "KL ≤ peer"), ("time_ratio", "time ratio"),
            ("reload_exact", "reload exact")]
    print(table(out_rows, cols))
    print(json.dumps(checks, indent=2))


if __name__ == "__main__":
    main()
