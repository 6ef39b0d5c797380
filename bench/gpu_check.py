"""GPU check of the calibration pass: ``device='cuda'`` against ``device='cpu'`` in one run.

A random-weight Llama (hidden 2048, 8 blocks) stays in host memory; blocks visit the GPU one
at a time. Prints a table: wall time of each device, the CPU/GPU time ratio, peak GPU memory
against the model size, agreement of the integers, and logit error vs the base for both.

    python bench/gpu_check.py [--layers 8] [--hidden 2048] [--samples 64] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llmpress as lp  # noqa: E402
from llmpress.nn import QuantLinear  # noqa: E402


def build(hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 512,
                      max_position_embeddings=4096)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # anisotropic activations as in trained LMs
        e = m.model.embed_tokens.weight
        e.copy_(torch.randn(e.shape[0], 64) @ torch.randn(64, e.shape[1]) * 0.02 + 0.01 * torch.randn_like(e))
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--json")
    ap.add_argument("--skip-cpu", action="store_true", help="GPU only (no CPU comparison)")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    base = build(a.hidden, a.layers)
    g = torch.Generator().manual_seed(0)
    tokens = (torch.randint(0, 32000, (a.samples, 1), generator=g) + torch.randint(1, 50, (a.samples, a.seqlen), generator=g).cumsum(1)) % 32000
    held = tokens[:4, :256].roll(7, dims=1)
    rec = lp.recipe("w4a16-gptq", group_size=128)
    model_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    out = {}
    models = {}
    for dev in ("cuda",) if a.skip_cpu else ("cuda", "cpu"):
        m = copy.deepcopy(base)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rep = lp.compress(m, rec, tokens, device=dev, progress=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        out[dev] = dict(seconds=time.perf_counter() - t0, peak_gpu_mb=rep.peak_gpu_mb)
        models[dev] = m
        assert all(p.device.type == "cpu" for p in m.parameters()), "model must stay on the host"
    same = None
    if "cpu" in models:
        qa = [x.qdata for x in models["cuda"].modules() if isinstance(x, QuantLinear)]
        qb = [x.qdata for x in models["cpu"].modules() if isinstance(x, QuantLinear)]
        same = sum(int((x == y).sum()) for x, y in zip(qa, qb, strict=True)) / sum(x.numel() for x in qa)
    with torch.no_grad():
        ref = base(held).logits
        err = {d: float(((models[d](held).logits - ref).norm() / ref.norm())) for d in models}
    row = {
        "shape": f"llama hidden {a.hidden}, {a.layers} blocks, {model_mb:.0f} MiB fp32 on host",
        "calib": f"{a.samples}x{a.seqlen}", "recipe": rec.name,
        "gpu_seconds": out["cuda"]["seconds"], "cpu_seconds": out.get("cpu", {}).get("seconds"),
        "cpu_over_gpu": out["cpu"]["seconds"] / out["cuda"]["seconds"] if "cpu" in out else None,
        "peak_gpu_mib": out["cuda"]["peak_gpu_mb"], "model_mib": model_mb,
        "identical_int_fraction": same, "rel_logit_err_gpu": err["cuda"], "rel_logit_err_cpu": err.get("cpu"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }
    print("| " + " | ".join(row) + " |")
    print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
