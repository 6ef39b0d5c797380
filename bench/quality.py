"""Quality table for smollm2-135m under the pinned protocol (DESIGN.md section 4).

Each recipe is compressed by the real CLI in its own process (so its wall time and peak RSS
are its own), then every saved checkpoint is read back with ``llmpress.load`` and evaluated on
the same windows against the base. The GPTQ W4 checkpoint is also loaded by plain
transformers + compressed-tensors to check that it gives the same perplexity.

    python bench/quality.py [--n-windows 24] [--out out/bench]

Writes bench/results/quality-smollm2-135m.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (row name, preset, group size, observer). The GPTQ presets use observer mse; the -minmax
# rows are the ablation with plain min-max group scales.
ROWS = [
    ("rtn-w8", "w8a16", -1, "minmax"),
    ("rtn-w4-g64", "w4a16-rtn", 64, "minmax"),
    ("gptq-w4-g64", "w4a16-gptq", 64, "mse"),
    ("gptq-w4-g64-minmax", "w4a16-gptq", 64, "minmax"),
    ("rtn-w3-g64", "w3a16-rtn", 64, "minmax"),
    ("gptq-w3-g64", "w3a16-gptq", 64, "mse"),
    ("gptq-w3-g64-minmax", "w3a16-gptq", 64, "minmax"),
]


def _recipe_file(out: Path, name: str, preset: str, g: int, observer: str) -> Path:
    import llmpress as lp

    r = lp.recipe(preset, group_size=g, observer=observer)
    p = out / f"{name}.yaml"
    p.write_text(lp.Recipe(r.steps, name).to_yaml())
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-windows", type=int, default=24)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--rows", default=",".join(r[0] for r in ROWS))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = a.rows.split(",")
    cli = [sys.executable, "-m", "llmpress.cli"]

    compress = {}
    for name, preset, g, observer in [r for r in ROWS if r[0] in wanted]:
        rf = _recipe_file(out, name, preset, g, observer)
        cmd = cli + ["compress", "smollm2-135m", "--recipe", str(rf), "-o", str(out / name), "--overwrite",
                     "--json", str(out / f"{name}.json")]
        print("$", " ".join(cmd[2:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
        rep = json.loads((out / f"{name}.json").read_text())
        compress[name] = dict(rep["compression"], wall=time.perf_counter() - t0, recipe=rep["recipe"],
                              command=f"llmpress compress smollm2-135m --recipe {preset} --group-size {g}"
                              + (" (recipe file with observer: minmax)" if "minmax" in name and "gptq" in name else "")
                              + f" -o {name}")

    import torch

    import llmpress as lp
    from llmpress.eval.report import table

    torch.manual_seed(0)
    base = lp.load("smollm2-135m")
    models = {"base": base}
    paths = {}
    for name in compress:
        models[name] = lp.load(out / name)
        paths[name] = out / name
    ev = lp.evaluate_many(models, base, n_windows=a.n_windows, paths=paths)

    rows = []
    base_ppl = ev["base"].ppl
    for name, r in ev.items():
        c = compress.get(name)
        step = c["recipe"]["steps"][0] if c else None
        rows.append({
            "recipe": name,
            "method": step["method"] if step else "none",
            "bits": step["bits"] if step else 32,
            "group_size": (step["group_size"] if step and step["group_size"] not in (None, -1) else (-1 if step else None)),
            "observer": step["observer"] if step else None,
            "ppl": r.ppl, "delta_ppl_pct": 100 * (r.ppl / base_ppl - 1), "kl": r.kl, "top1": r.top1,
            "size_mb": r.size_mb, "bits_per_weight": r.bits_per_weight,
            "seconds": c["seconds"] if c else 0.0, "peak_rss_mb": c["peak_rss_mb"] if c else None,
            "command": c["command"] if c else "llmpress eval smollm2-135m",
        })
    # the same checkpoint through plain transformers + compressed-tensors
    from transformers import AutoModelForCausalLM

    check = {}
    if "gptq-w4-g64" in compress:
        hf = AutoModelForCausalLM.from_pretrained(out / "gptq-w4-g64", dtype=torch.float32)
        hf_ppl = lp.evaluate(hf, tokenizer=base.llmpress_tokenizer, n_windows=a.n_windows).ppl
        check = {"checkpoint": "gptq-w4-g64", "llmpress_ppl": ev["gptq-w4-g64"].ppl, "transformers_ppl": hf_ppl,
                 "rel_diff": abs(hf_ppl / ev["gptq-w4-g64"].ppl - 1)}

    def ratio(g, r):
        if g in ev and r in ev:
            return (ev[g].ppl - base_ppl) / (ev[r].ppl - base_ppl)
        return None

    summary = {
        "gptq_w4_increase_over_rtn_w4": ratio("gptq-w4-g64", "rtn-w4-g64"),
        "gptq_w4_minmax_increase_over_rtn_w4": ratio("gptq-w4-g64-minmax", "rtn-w4-g64"),
        "gptq_w3_increase_over_rtn_w3": ratio("gptq-w3-g64", "rtn-w3-g64"),
        "gptq_w3_minmax_increase_over_rtn_w3": ratio("gptq-w3-g64-minmax", "rtn-w3-g64"),
        "rtn_w8_ppl_increase_pct": 100 * (ev["rtn-w8"].ppl / base_ppl - 1) if "rtn-w8" in ev else None,
        "transformers_check": check,
    }
    result = {
        "model": "smollm2-135m", "protocol": f"wiki eval, {a.n_windows}x1024 tokens; calib 64x512 seed 0; fp32 CPU",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"), "rows": rows, "summary": summary,
    }
    dest = ROOT / "bench" / "results" / "quality-smollm2-135m.json"
    dest.write_text(json.dumps(result, indent=2))
    cols = [("recipe", "recipe"), ("ppl", "ppl"), ("delta_ppl_pct", "Δppl %"), ("kl", "KL"), ("top1", "top-1"),
            ("size_mb", "size MB"), ("bits_per_weight", "bits/w"), ("seconds", "compress s"), ("peak_rss_mb", "peak RSS MB")]
    print(table(rows, cols))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
