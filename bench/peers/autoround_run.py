"""auto-round (SignRound) on smollm2-135m (CPU, fp32 forced), in llmcompressor's virtual
environment (auto-round comes with it):

    .lc-venv/bin/python bench/peers/autoround_run.py OUT_DIR CALIB.safetensors [ITERS]

Uses llmpress's 64 x 512 calibration tokens (batches of 8) and W4 g64 symmetric, like the GPTQ
rows. auto-round's default is 200 sign-SGD steps per block; on 2 CPU cores that takes hours,
so ITERS (default 50) is recorded in peer.json. amp is off (auto-round would otherwise run the
block in bf16 on CPU). The result is saved in auto-round's "fake" format (dense weights on
the quantization grid), which llmpress reads as a float checkpoint for the pinned evaluation;
peer.json holds the settings, seconds, or the error if auto-round failed on CPU.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from _record import peer_row  # bench/peers/_record.py (the script's folder is on sys.path)

MODEL = Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress")) / "models" / "smollm2-135m"


def main() -> None:
    import auto_round
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, calib = Path(sys.argv[1]), load_file(sys.argv[2])["tokens"]
    iters = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    name = f"ar-w4-g64-i{iters}"
    info = {"tool": "auto-round", "version": auto_round.__version__, "method": "signround", "bits": 4, "group_size": 64,
            "settings": f"AutoRound(bits=4, group_size=64, sym=True, iters={iters}, nsamples={calib.shape[0]}, "
                        f"seqlen={calib.shape[1]}, batch_size=8, amp=False, device_map='cpu'), format='fake'"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(MODEL)
    batches = [calib[i : i + 8] for i in range(0, calib.shape[0], 8)]
    with peer_row(out, name, info) as t0:
        ar = AutoRound(model, tokenizer=tok, scheme="W4A16", bits=4, group_size=64, sym=True, dataset=batches,
                       iters=iters, nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=8, amp=False,
                       device_map="cpu", low_gpu_mem_usage=False)
        ar.quantize_and_save(str(out / name), format="fake")
        info["seconds"] = time.perf_counter() - t0
        for cfg in list((out / name).glob("*/config.json")):  # auto-round writes into a sub-folder
            for f in cfg.parent.iterdir():
                f.replace(out / name / f.name)
            cfg.parent.rmdir()
        tok.save_pretrained(out / name)


if __name__ == "__main__":
    main()
