"""Quantize smollm2-135m with peer libraries, in the peers virtual environment.

    .peers-venv/bin/python bench/peers/quantize_peers.py OUT_DIR [hqq,bnb] [HQQ_BITS e.g. 2,4]

Every linear layer inside the decoder blocks (lm_head and embeddings stay fp32, as in the
llmpress rows) is quantized by the peer's own quantizer on CPU in fp32, then dequantized by the
peer's own dequantizer; the model with those weights is saved as a plain fp32 safetensors
checkpoint plus ``peer.json`` (tool, version, settings, quantization seconds, storage bits of
the peer's format). bench/peers/run.py evaluates them beside llmpress under the pinned protocol.
Peers: hqq (HQQ, axis 0 and 1, 2/3/4/8 bits, group 64), bitsandbytes (NF4 / FP4, block 64,
double quantization).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

torch.manual_seed(0)
MODEL = Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress")) / "models" / "smollm2-135m"


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def hqq_rows(bits_list=(4, 3, 2, 8)):
    import hqq
    from hqq.core.quantize import Quantizer

    for bits in bits_list:
        for axis in (1, 0):
            def quant(w, bits=bits, axis=axis):
                wq, meta = Quantizer.quantize(w, nbits=bits, group_size=64, optimize=True, axis=axis, bitpack=False,
                                              compute_dtype=torch.float32, device="cpu")
                meta["compute_dtype"] = torch.float32
                return Quantizer.dequantize(wq, meta).reshape(w.shape)
            # hqq stores scale and zero per group in fp16 by default (quant_zero/quant_scale off)
            yield (f"hqq-w{bits}-g64-axis{axis}", dict(tool="hqq", version=hqq.__version__, method="hqq", bits=bits,
                   group_size=64, settings=f"Quantizer.quantize(nbits={bits}, group_size=64, optimize=True, axis={axis})",
                   bits_per_weight=bits + 32 / 64), quant)


def bnb_rows():
    import bitsandbytes
    import bitsandbytes.functional as F

    for qt in ("nf4", "fp4"):
        def quant(w, qt=qt):
            packed, st = F.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=True)
            return F.dequantize_4bit(packed, st).float()
        yield (f"bnb-{qt}-b64-dq", dict(tool="bitsandbytes", version=bitsandbytes.__version__, method=qt, bits=4,
               group_size=64, settings=f"quantize_4bit(blocksize=64, quant_type='{qt}', compress_statistics=True)",
               bits_per_weight=4 + 8 / 64 + 32 / (64 * 256)), quant)


def main() -> None:
    from transformers import AutoModelForCausalLM

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    which = sys.argv[2].split(",") if len(sys.argv) > 2 else ["hqq", "bnb"]
    hqq_bits = tuple(int(b) for b in sys.argv[3].split(",")) if len(sys.argv) > 3 else (4, 3, 2, 8)  # hqq rows only
    gens = {"hqq": lambda: hqq_rows(hqq_bits), "bnb": bnb_rows}
    for tool in which:
        for name, info, quant in gens[tool]():
            model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
            lin = _linears(model)
            t0 = time.perf_counter()
            with torch.no_grad():
                for m in lin.values():
                    m.weight.copy_(quant(m.weight.data))
            info["seconds"] = time.perf_counter() - t0
            info["layers"] = len(lin)
            model.save_pretrained(out / name, safe_serialization=True)
            (out / name / "peer.json").write_text(json.dumps(info, indent=2))
            print(f"{name}: {info['seconds']:.2f}s", flush=True)


if __name__ == "__main__":
    main()
