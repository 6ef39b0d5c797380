"""GPTQModel (GPTQ) on smollm2-135m (CPU, fp32 forced), in its own virtual environment.

    GPTQMODEL_CPU_WORKERS=2 .gm-venv/bin/python bench/peers/gptqmodel_run.py OUT_DIR CALIB.safetensors [rows]

Uses exactly llmpress's 64x512 calibration tokens (CALIB). GPTQModel quietly computes in bf16
on CPU unless told otherwise, so the model is loaded with ``dtype=torch.float32``. The quantized
model is saved in GPTQModel's own format, read back by GPTQModel's torch kernel and every
quantized linear is dequantized by GPTQModel itself into a plain fp32 checkpoint (the same
pattern as bench/peers/quantize_peers.py), with ``peer.json`` (settings, quantization seconds,
storage bits of the format, or the error if the peer failed on CPU).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from _record import peer_row  # bench/peers/_record.py (the script's folder is on sys.path)

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
MODEL = Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress")) / "models" / "smollm2-135m"


def _dequantized_fp32(qdir: Path, dst: Path) -> int:
    """Read GPTQModel's checkpoint with its torch kernel (which runs in fp16/bf16 only) and let
    it dequantize every linear with its fp16 scales cast to fp32 (exact: the values are fp16's,
    only the products are kept in fp32); write the dequantized fp32 model."""
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM

    q = GPTQModel.load(str(qdir), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    deq = {}
    for n, m in q.model.named_modules():
        if hasattr(m, "dequantize_weight") and hasattr(m, "qweight"):
            m.scales = m.scales.float()
            w = m.dequantize_weight().float()
            assert w.shape == (m.in_features, m.out_features), (n, tuple(w.shape))  # GPTQModel's [in, out]
            deq[n] = w.t()
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for n, w in deq.items():
            lin = mods[n]
            lin.weight.copy_(w)
    model.save_pretrained(dst, safe_serialization=True)
    return len(deq)


def main() -> None:
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    import gptqmodel

    out = Path(sys.argv[1])
    calib = load_file(sys.argv[2])["tokens"]
    want = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    calib = calib[: int(os.environ.get("N_SAMPLES", calib.shape[0]))]  # a smaller N only for a smoke test
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    for bits in (4, 3):
        name = f"gptqmodel-gptq-w{bits}-g64"
        if want and name not in want:
            continue
        # the llmpress GPTQ rows: symmetric, group 64, act order, damp 0.01, mse clipping search
        qc = QuantizeConfig(bits=bits, group_size=64, sym=True, desc_act=True, damp_percent=0.01,
                            mse=float(os.environ.get("GPTQ_MSE", "2.4")))
        info = {"tool": "gptqmodel", "version": gptqmodel.__version__, "method": "gptq", "bits": bits,
                "group_size": 64, "settings": repr(qc)[:600],
                "bits_per_weight": bits + (16 + bits) / 64}  # fp16 scale + packed zero per group
        tmp = out / f"{name}.gptq"  # the peer's own checkpoint, kept beside the dequantized one
        with peer_row(out, name, info) as t0:
            model = GPTQModel.load(str(MODEL), qc, device="cpu", dtype=torch.float32)
            model.quantize(data, batch_size=1, calibration_sort=None)
            info["seconds"] = time.perf_counter() - t0
            model.save(str(tmp))
            del model
            info["layers"] = _dequantized_fp32(tmp, out / name)
            AutoTokenizer.from_pretrained(MODEL).save_pretrained(out / name)


if __name__ == "__main__":
    main()
