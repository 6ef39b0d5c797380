"""Quantization time of the calibration-free methods (HQQ, NF4, FP4): llmpress and its peers
(hqq, bitsandbytes) timed in turn, several rounds, so a drift in the machine's speed hits both.

    .venv/bin/python bench/peers/time_calibfree.py [--reps 3]

Each round runs bench/peers/quantize_peers.py in the peers' environment (it times each peer's
own quantize + dequantize loop over the block linears and writes peer.json), then times
``llmpress.compress`` of the paired llmpress rows here (the same wall time bench/methods.py
reports). Writes bench/results/calibfree-times-smollm2-135m.json: per-round seconds and the
median time ratio (llmpress / peer) per pair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from methods import PAIRS, ROWS, _recipe  # noqa: E402

import llmpress as lp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peers-py", default=str(ROOT / ".peers-venv" / "bin" / "python"))
    a = ap.parse_args()
    pairs = {p: o for p, o in PAIRS.items() if p.startswith(("hqq-", "bnb-"))}
    peer_s: dict[str, list[float]] = {p: [] for p in pairs}
    ours_s: dict[str, list[float]] = {o: [] for o in set(pairs.values())}
    for rep in range(a.reps):
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([a.peers_py, str(ROOT / "bench/peers/quantize_peers.py"), d], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for p in pairs:
                peer_s[p].append(json.loads((Path(d) / p / "peer.json").read_text())["seconds"])
        for o in ours_s:
            m = lp.load("smollm2-135m")
            t0 = time.perf_counter()
            lp.compress(m, _recipe(*ROWS[o]), None, progress=False)
            ours_s[o].append(time.perf_counter() - t0)
            del m
        print(f"round {rep + 1}/{a.reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in {**peer_s, **ours_s}.items()),
              flush=True)
    rows = []
    for p, o in pairs.items():
        mp, mo = statistics.median(peer_s[p]), statistics.median(ours_s[o])
        rows.append({"peer_row": p, "llmpress_row": o, "peer_seconds": peer_s[p], "llmpress_seconds": ours_s[o],
                     "peer_median": mp, "llmpress_median": mo, "time_ratio": mo / mp})
        print(f"{p:24s} {mp:7.2f}s   {o:20s} {mo:7.2f}s   ratio {mo / mp:.2f}")
    out = ROOT / "bench" / "results" / "calibfree-times-smollm2-135m.json"
    out.write_text(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                               "date": time.strftime("%Y-%m-%d"), "reps": a.reps,
                               "command": "python bench/peers/time_calibfree.py", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
