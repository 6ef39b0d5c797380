"""bitsandbytes LLM.int8() on smollm2-135m (CPU), in the peers virtual environment.

    PYTHONPATH=. .peers-venv/bin/python bench/peers/bnb_int8_run.py OUT_DIR

LLM.int8() quantizes activations at run time (per token, with outlier columns above the
threshold kept in 16-bit), so its quality cannot be captured by a dequantized checkpoint: the
model is loaded the way users load it (transformers ``BitsAndBytesConfig(load_in_8bit=True)``,
block linears only, lm_head kept) and evaluated right here with llmpress's own evaluation code
(the pinned protocol, the same windows and base) imported from the checkout. ``peer.json``
carries ppl / KL / top-1 and the load-and-quantize seconds; bench/methods.py takes them as they
are.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

MODEL = Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress")) / "models" / "smollm2-135m"


def main() -> None:
    import bitsandbytes
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import llmpress as lp

    out = Path(sys.argv[1]) / "bnb-llm-int8"
    out.mkdir(parents=True, exist_ok=True)
    n_windows = int(os.environ.get("N_WINDOWS", "24"))
    info = {"tool": "bitsandbytes", "version": bitsandbytes.__version__, "method": "llm.int8", "bits": 8,
            "group_size": -1, "settings": "BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)",
            "bits_per_weight": 8 + 32 / 576, "evaluated_in_peer_env": True}
    try:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            MODEL, dtype=torch.float32, device_map="cpu",
            quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0,
                                                   llm_int8_skip_modules=["lm_head"]))
        info["seconds"] = time.perf_counter() - t0  # load + quantize (the peer quantizes while loading)
        n8 = sum(type(m).__name__ == "Linear8bitLt" for m in model.modules())
        info["layers"] = n8
        base = lp.load("smollm2-135m")
        r = lp.evaluate(model, base, tokenizer=base.llmpress_tokenizer, n_windows=n_windows, progress=False)
        weights = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Linear8bitLt")
        rest = sum(p.numel() * 4 for n, p in model.named_parameters() if "proj" not in n)
        info.update(ppl=r.ppl, kl=r.kl, top1=r.top1, size_mb=(weights * info["bits_per_weight"] / 8 + rest) / 1e6)
    except Exception as e:  # a peer failing on CPU is a result: keep the row with its error
        info.setdefault("seconds", None)
        info["error"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
    (out / "peer.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2), flush=True)


if __name__ == "__main__":
    main()
