"""Where GPTQ's time goes on one Llama-3-8B block (the solve phase of bench/scale.py): the four
stacked solves (q/k/v, o, gate/up, down) with random weights and a Hessian from random
activations, timed as a whole and by part (scale search, inverse Cholesky, lazy batches).

    python bench/gptq_profile.py [--device cuda] [--out bench/results/gptq-profile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmpress.quant import gptq as G  # noqa: E402
from llmpress.quant.primitives import QuantScheme, compute_qparams  # noqa: E402

UNITS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate+up": (28672, 4096), "down": (4096, 14336)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every shape (CPU smoke runs)")
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    scheme = QuantScheme(4, True, "group", 128)
    rows = []
    for name, (n, k) in UNITS.items():
        n, k = max(128, int(n * a.scale) // 128 * 128), max(128, int(k * a.scale) // 128 * 128)
        w = torch.randn(n, k, generator=g, device=dev) * 0.02
        x = (torch.randn(8192, k, generator=g, device=dev) * torch.rand(k, generator=g, device=dev)).bfloat16()
        h = (2 * x.float().T @ x.float() / x.shape[0])
        for _ in range(2):  # warm-up (kernel compilation), then timed
            sync()
            t0 = time.perf_counter()
            G.gptq(w, h, scheme, G.GPTQConfig(observer="mse"))
            sync()
            total = time.perf_counter() - t0
        t0 = time.perf_counter()
        compute_qparams(w, scheme, "mse", torch.diag(h))
        sync()
        mse = time.perf_counter() - t0
        t0 = time.perf_counter()
        G._inverse_cholesky(h, 0.01, 6, name)
        sync()
        chol = time.perf_counter() - t0
        t0 = time.perf_counter()
        G.gptq(w, h, scheme, G.GPTQConfig(observer="minmax"))
        sync()
        minmax = time.perf_counter() - t0
        row = {"unit": name, "shape": [n, k], "gptq_mse_s": total, "gptq_minmax_s": minmax, "mse_search_s": mse,
               "inverse_cholesky_s": chol, "rest_s": total - mse - chol}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "rows": rows,
           "block_total_s": sum(r["gptq_mse_s"] for r in rows), "command": "python bench/gptq_profile.py " + " ".join(sys.argv[1:])}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
