"""K-quant solve time for a Llama-3-8B-shaped model on the GPU (random bf16-scale weights).

Every block linear of 32 blocks (hidden 4096, ffn 14336, 8 key/value heads) is solved with the
type llama.cpp's Q4_K_M rules give it (Q4_K, Q6_K on the use_more_bits attn_v / ffn_down), with
and without an importance vector; the time is the GPU's (synchronised), weights made on the GPU
one layer at a time. A CPU-vs-GPU check on one layer: the fraction of identical super-block bytes
and the error ratio of the two results.

    python bench/gguf_gpu.py [--blocks 32]

Prints a table and writes bench/results/gguf-gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=32)
    a = ap.parse_args()
    from llmpress.formats.gguf import mix_type
    from llmpress.quant import kquants

    dev = torch.device("cuda")
    shapes = {"attn_q": (4096, 4096), "attn_k": (1024, 4096), "attn_v": (1024, 4096), "attn_output": (4096, 4096),
              "ffn_gate": (14336, 4096), "ffn_up": (14336, 4096), "ffn_down": (4096, 14336)}
    g = torch.Generator(device=dev).manual_seed(0)
    res = {}
    for imp_on in (False, True):
        total, n_w, types = 0.0, 0, {}
        for i in range(a.blocks):
            for k, (r, c) in shapes.items():
                t, _ = mix_type("q4_k_m", f"blk.{i}.{k}.weight", c, a.blocks, 4, False)
                w = torch.randn(r, c, device=dev, generator=g) * 0.02
                imp = torch.rand(c, device=dev, generator=g) ** 2 if imp_on else None
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                kquants.quantize_rows(w, t, imp)
                torch.cuda.synchronize()
                total += time.perf_counter() - t0
                n_w += w.numel()
                types[t] = types.get(t, 0) + 1
        res["imatrix" if imp_on else "plain"] = {"seconds": total, "weights": n_w, "types": types,
                                                 "ns_per_weight": 1e9 * total / n_w}
        print(f"q4_k_m {'with' if imp_on else 'without'} importance: {total:.1f} s for {n_w / 1e9:.2f} G weights "
              f"({types})", flush=True)
    big = torch.randn(14336, 4096, device=dev, generator=g) * 0.02
    for ch in (2048, 8192, 32768):
        kquants._CHUNK_CUDA = ch
        kquants.quantize_rows(big, "q4_k")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        kquants.quantize_rows(big, "q4_k")
        torch.cuda.synchronize()
        res[f"chunk_{ch}_seconds_14336x4096_q4_k"] = time.perf_counter() - t0
    w = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(1)) * 0.02
    cpu = kquants.quantize_rows(w, "q4_k")
    gpu = kquants.quantize_rows(w.to(dev), "q4_k")
    same = float((cpu.view(-1, 144) == gpu.view(-1, 144)).all(1).float().mean())
    res["cpu_gpu_identical_superblocks"] = same
    res["device"] = torch.cuda.get_device_name()
    res["torch"] = torch.__version__
    res["command"] = "python bench/gguf_gpu.py " + " ".join(sys.argv[1:])
    print(json.dumps(res, indent=1))
    (ROOT / "bench" / "results" / "gguf-gpu.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
