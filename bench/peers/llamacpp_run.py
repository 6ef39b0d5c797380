"""llama.cpp (llama-cpp-python) side of bench/export.py, run in the peer environment.

    .llama-venv/bin/python bench/peers/llamacpp_run.py quantize SRC.gguf DST.gguf FTYPE
    .llama-venv/bin/python bench/peers/llamacpp_run.py generate MODEL.gguf REQUEST.json

``quantize`` is llama.cpp's own ``llama_model_quantize`` (what the ``llama-quantize`` tool
runs); FTYPE is a llama_ftype number. ``generate`` reads {"prompts": [[token ids]...], "n": N}
and prints JSON: llama.cpp's own tokenization of each text (when given) and its greedy
continuation of each prompt's token ids.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time


def quantize(src: str, dst: str, ftype: int) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    print(json.dumps({"seconds": time.perf_counter() - t0, "version": llama_cpp.__version__}))


def generate(model: str, req: str) -> None:
    import llama_cpp

    r = json.load(open(req))
    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=2, verbose=False, logits_all=False)
    out = {"version": llama_cpp.__version__, "tokenized": [], "continuations": []}
    for text in r.get("texts", []):
        out["tokenized"].append(llm.tokenize(text.encode(), add_bos=False, special=False))
    for ids in r["prompts"]:
        llm.reset()
        toks = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            toks.append(int(t))
            if len(toks) >= r["n"]:
                break
        out["continuations"].append(toks)
    print(json.dumps(out))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "quantize":
        quantize(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "generate":
        generate(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown command {cmd!r}")
