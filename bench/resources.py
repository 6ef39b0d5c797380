"""Predicted vs measured resources of `llmpress compress` on smollm2-135m: each recipe runs as
its own process (`llmpress compress ... --json`), which predicts its peak host memory, size and
time from config.json before loading anything and then measures them (peak RSS of the whole
command, saving included; safetensors bytes on disk; compression seconds).

  python bench/resources.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPES = ["w4a16-rtn -g 64", "nf4", "w3a16-hqq -g 64", "w4a16-gptq -g 64", "w4a16-awq -g 64", "2of4-wanda",
           "asvd80", "drop25-angular"]


# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default=";".join(RECIPES), help="';'-separated recipe arguments")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for spec in a.recipes.split(";"):
            args = spec.split()
            out, rep = Path(work) / "out", Path(work) / "r.json"
            subprocess.run([sys.executable, "-m", "llmpress", "compress", a.model, "--recipe", *args, "-o", str(out),
                            "--overwrite", "--json", str(rep)], check=True, stdout=subprocess.DEVNULL)
            r = json.loads(rep.read_text())
            disk = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
            p = r["prediction"]
            rows.append(dict(recipe=r["recipe"]["name"], predicted_peak_mb=p["peak_rss_mb"], measured_peak_mb=r["peak_rss_mb"],
                             peak_err_pct=100 * (p["peak_rss_mb"] / r["peak_rss_mb"] - 1), predicted_size_mb=p["disk_mb"],
                             size_mb=disk, size_err_pct=100 * (p["disk_mb"] / disk - 1), predicted_s=p["seconds"],
                             compress_s=r["compression"]["seconds"], parts=p["parts"]))
            print(f"{rows[-1]['recipe']:22s} peak {r['peak_rss_mb']:6.0f} pred {p['peak_rss_mb']:6.0f} "
                  f"({rows[-1]['peak_err_pct']:+.1f}%)  size {disk:7.2f} pred {p['disk_mb']:7.2f}  "
                  f"time {r['compression']['seconds']:5.0f}s pred {p['seconds']:5.0f}s", flush=True)
            shutil.rmtree(out)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    res = dict(model=a.model, machine="2-core CPU, 24 GB, fp32; one process per recipe", rows=rows)
    (Path(a.out) / f"resources-{a.model}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
