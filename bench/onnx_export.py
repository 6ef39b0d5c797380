"""ONNX export of smollm2-135m, run by onnxruntime (CPU), under the pinned protocol (DESIGN.md section 4).

Rows: the fp32 model exported as float32; the fp32 model exported as int4 (float layers rounded
to 4 bits, blocks of 32, int8 embedding / head); the GPTQ W4 g64 model exported as int4 (its
integers kept). For each: file size, ppl and KL against the torch fp32 base on the same windows
(log-probs from onnxruntime's logits), the relative logit error against the torch model it came
from (first window), greedy continuations of a few prompts through the exported KV cache
compared with transformers' ``generate`` on that model, and onnxruntime's decode speed relative to
the float32 export measured in the same run (64 cached steps after a 128-token prompt).

    python bench/onnx_export.py [--n-windows 24]

Writes bench/results/onnx-smollm2-135m.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPTS = ["The history of the Roman Empire", "Photosynthesis is the process by which",
           "In mathematics, a prime number is"]


def _logprobs(x: np.ndarray) -> torch.Tensor:
    return torch.log_softmax(torch.from_numpy(x).float(), -1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-windows", type=int, default=24)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench" / "onnx"))
    ap.add_argument("--gen-tokens", type=int, default=24)
    a = ap.parse_args()
    import llmpress as lp
    from llmpress.eval.report import table
    from llmpress.formats.onnx import OnnxLM, save_onnx

    out = Path(a.out)
    base = lp.load("smollm2-135m")
    tok = base.llmpress_tokenizer
    gptq = lp.load("smollm2-135m")
    lp.compress(gptq, lp.recipe("w4a16-gptq", group_size=64), lp.data.calibration("wiki"), progress=False)
    rows_spec = [("float32", base, "float32"), ("int4 (rounded at export)", base, "int4"),
                 ("int4 (GPTQ w4 g64 integers)", gptq, "int4")]
    windows = lp.data.eval_windows(tok, "wiki", 1024, a.n_windows)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    rows = []
    speed_base = None
    for name, model, w in rows_spec:
        d = out / name.split()[0].replace("(", "") / ("gptq" if model is gptq else "base")
        s = save_onnx(model, d, w, overwrite=True)
        r = OnnxLM(d, threads=2)
        nll = kl = 0.0
        top1 = n = 0
        rel = None
        t0 = time.perf_counter()
        for i, win in enumerate(windows):
            got = r.logits(win[None].numpy())[0, :-1]
            lp_o = _logprobs(got)
            with torch.inference_mode():
                b = torch.log_softmax(base(input_ids=win[None], use_cache=False).logits[0, :-1].float(), -1)
                if i == 0:
                    src = model(input_ids=win[None], use_cache=False).logits[0, :-1].float().numpy()
                    rel = float(np.linalg.norm(got - src) / np.linalg.norm(src))
            tgt = win[1:]
            nll += float(-lp_o.gather(1, tgt[:, None]).sum())
            kl += float((b.exp() * (b - lp_o)).sum())
            top1 += int((b.argmax(-1) == lp_o.argmax(-1)).sum())
            n += tgt.numel()
        eval_s = time.perf_counter() - t0
        same = []
        for ids in prompts:
            with torch.inference_mode():
                want = model.generate(torch.tensor([ids]), max_new_tokens=a.gen_tokens, do_sample=False)[0, len(ids):].tolist()
            same.append(r.generate(ids, a.gen_tokens) == want)
        # decode speed: 64 cached steps after a 128-token prompt
        logits, cache = r.forward(windows[0][None, :128].numpy())
        t0 = time.perf_counter()
        nxt = int(logits[0, -1].argmax())
        for _ in range(64):
            logits, cache = r.forward(np.asarray([[nxt]]), cache)
            nxt = int(logits[0, -1].argmax())
        tps = 64 / (time.perf_counter() - t0)
        speed_base = speed_base or tps
        rows.append({"export": name, "size_mb": s["size_mb"], "ppl": math.exp(nll / n), "kl": kl / n, "top1": top1 / n,
                     "rel_logit_err_vs_source": rel, "greedy_same_as_transformers": same,
                     "decode_speed_vs_float32_export": tps / speed_base, "eval_seconds": eval_s})
        print(rows[-1], flush=True)
    with torch.inference_mode():
        base_ppl = lp.evaluate(base, n_windows=a.n_windows, progress=False).ppl
    print(table(rows, [("export", "export"), ("size_mb", "size MB"), ("ppl", "ppl"), ("kl", "KL"), ("top1", "top-1"),
                       ("rel_logit_err_vs_source", "rel. logit err"), ("decode_speed_vs_float32_export", "decode x")]))
    f = ROOT / "bench" / "results" / "onnx-smollm2-135m.json"
    import onnxruntime

    f.write_text(json.dumps({"model": "smollm2-135m", "base_ppl_torch": base_ppl, "rows": rows,
                             "protocol": f"wiki eval, {a.n_windows} x 1024-token windows, KL vs torch fp32 base",
                             "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                             "machine": f"{platform.machine()}, {os.cpu_count()} cores, 2 onnxruntime threads",
                             "command": "python bench/onnx_export.py " + " ".join(sys.argv[1:])}, indent=2))
    print(f"wrote {f}")


if __name__ == "__main__":
    main()
