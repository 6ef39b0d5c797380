"""GGUF export against llama.cpp on smollm2-135m, under the pinned protocol (DESIGN.md section 4).

For each llama.cpp file type (Q8_0 and the K-quant mixes) the same F32 GGUF (written by
llmpress) is quantized by llama.cpp's own ``llama_model_quantize`` (llama-cpp-python, in its own
environment) and by llmpress (``llmpress.export``; K mixes also with an importance matrix from
64 x 512 wiki calibration tokens). Then:

- tensor types: llmpress's per-tensor choice must equal llama.cpp's (mix rules and fallbacks);
- quality: every file is read back with transformers' GGUF loader (``llmpress.load``) and
  evaluated on the same windows against the base: ppl, KL, top-1, file size;
- llama.cpp runs the files: greedy continuations of a few prompts (llama.cpp on the GGUF vs
  transformers on the base model), and llama.cpp's tokenization of the prompts vs transformers';
- block quantizers alone: relative squared error of each K type on random Gaussian rows and on the
  real ``ffn_down`` weights (the tensors whose rows tile into 256), llmpress vs llama.cpp's
  ``ggml_quantize_chunk`` (called through ctypes from the peer's libggml-base), plain and
  importance-weighted with the same importance vector.

    python bench/export.py [--peer-python .llama-venv/bin/python] [--n-windows 24]

Writes bench/results/export-smollm2-135m.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FTYPES = {"q8_0": 7, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
          "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
GGML_ENUM = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10, "q3_k": 11, "q4_k": 12,
             "q5_k": 13, "q6_k": 14}
PROMPTS = ["The history of the Roman Empire", "Photosynthesis is the process by which",
           "In mathematics, a prime number is"]


def peer(py: str, *args: str) -> dict:
    r = subprocess.run([py, str(ROOT / "bench" / "peers" / "llamacpp_run.py"), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp helper failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def types_of(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}


class GGML:
    """llama.cpp's block quantizers through ctypes (ggml_quantize_chunk)."""

    def __init__(self, py: str) -> None:
        d = subprocess.run([py, "-c", "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))"],
                           capture_output=True, text=True, check=True).stdout.strip()
        self.lib = ctypes.CDLL(str(Path(d) / "lib" / "libggml-base.so"))
        f = self.lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_void_p]

    def quantize(self, w: torch.Tensor, t: str, imp: torch.Tensor | None = None) -> np.ndarray:
        import gguf

        x = np.ascontiguousarray(w.float().numpy())
        r, k = x.shape
        bs, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, t.upper())]
        out = np.zeros((r, k // bs * size), dtype=np.uint8)
        im = None if imp is None else np.ascontiguousarray(imp.float().numpy())
        self.lib.ggml_quantize_chunk(GGML_ENUM[t], x.ctypes.data, out.ctypes.data, 0, r, k,
                                     None if im is None else im.ctypes.data)
        return out


def dequant(b, t: str, shape) -> torch.Tensor:
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(np.asarray(b), getattr(gguf.GGMLQuantizationType, t.upper()))).reshape(shape)


def block_errors(ggml: GGML, real: dict[str, torch.Tensor], imat: dict[str, torch.Tensor]) -> list[dict]:
    from llmpress.quant import kquants

    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(512, 4096, generator=g) * 0.02
    rnd_imp = torch.rand(4096, generator=g) ** 4 * 10  # a skewed importance vector
    rows = []
    for t in kquants.TYPES:
        for data_name, mats in (("gaussian 512x4096", {"x": (rnd, rnd_imp)}),
                                ("smollm2 ffn_down (30 x 576x1536)", {n: (w, imat[n]) for n, w in real.items()})):
            acc = {k: [0.0, 0.0] for k in ("ours", "llama.cpp", "ours-w", "llama.cpp-w")}
            for w, imp in mats.values():
                for key, wt, b in (("ours", None, kquants.quantize_rows(w, t)), ("llama.cpp", None, ggml.quantize(w, t)),
                                   ("ours-w", imp, kquants.quantize_rows(w, t, imp)),
                                   ("llama.cpp-w", imp, ggml.quantize(w, t, imp))):
                    y = dequant(b, t, w.shape)
                    wt_ = 1.0 if wt is None else wt
                    acc[key][0] += float((wt_ * (y - w) ** 2).sum())
                    acc[key][1] += float((wt_ * w ** 2).sum())
            e = {k: v[0] / v[1] for k, v in acc.items()}
            rows.append({"type": t, "data": data_name, "rel_err_ours": e["ours"], "rel_err_llama_cpp": e["llama.cpp"],
                         "ratio": e["ours"] / e["llama.cpp"], "weighted_rel_err_ours": e["ours-w"],
                         "weighted_rel_err_llama_cpp": e["llama.cpp-w"], "weighted_ratio": e["ours-w"] / e["llama.cpp-w"]})
            print(f"  {t} {data_name}: ours/llama.cpp {rows[-1]['ratio']:.3f} (weighted {rows[-1]['weighted_ratio']:.3f})",
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", default=str(ROOT / ".llama-venv" / "bin" / "python"))
    ap.add_argument("--formats", default="q8_0,q4_k_m,q3_k_m,q5_k_m,q2_k")
    ap.add_argument("--n-windows", type=int, default=24)
    ap.add_argument("--imatrix-samples", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench" / "export"))
    ap.add_argument("--skip-blocks", action="store_true")
    a = ap.parse_args()
    import llmpress as lp
    from llmpress import calibrate
    from llmpress.eval.report import table

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = lp.load("smollm2-135m")
    tok = base.llmpress_tokenizer
    f32 = out / "f32.gguf"
    lp.export(base, f32, "gguf:f32", overwrite=True, progress=False)
    t0 = time.perf_counter()
    imat = calibrate.input_moments(base, lp.data.calibration("wiki", a.imatrix_samples, 512).tokens(tok), progress=False)
    imat_s = time.perf_counter() - t0
    files: dict[str, tuple[Path, str, str, float]] = {}  # key -> (path, format, tool, seconds)
    type_check = {}
    for f in a.formats.split(","):
        p = out / f"llama.cpp-{f}.gguf"
        r = peer(a.peer_python, "quantize", str(f32), str(p), str(FTYPES[f]))
        files[f"llama.cpp {f}"] = (p, f, "llama.cpp " + r["version"], r["seconds"])
        variants = [("", None)] + ([("-imatrix", imat)] if f != "q8_0" else [])
        for suffix, im in variants:
            q = out / f"llmpress-{f}{suffix}.gguf"
            t0 = time.perf_counter()
            lp.export(base, q, f"gguf:{f}", overwrite=True, imatrix=im, progress=False)
            files[f"llmpress {f}{suffix}"] = (q, f, "llmpress" + (" + imatrix" if im else ""),
                                              time.perf_counter() - t0 + (imat_s if im else 0.0))
        ta, tb = types_of(p), types_of(out / f"llmpress-{f}.gguf")
        type_check[f] = {"tensors": len(ta), "same_types": ta == tb,
                         "differences": {k: [ta[k], tb.get(k)] for k in ta if ta[k] != tb.get(k)}}
        print(f"{f}: tensor types equal to llama.cpp's: {ta == tb}", flush=True)

    # llama.cpp runs the files: greedy continuations vs transformers on the same file (its GGUF
    # loader dequantizes the blocks) and vs the fp32 base; the first divergence and transformers'
    # logit margin there (llama.cpp's CPU matmuls round activations to 8 bits for Q8_0 weights)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    req = out / "gen.json"
    req.write_text(json.dumps({"prompts": prompts, "n": a.gen_tokens, "texts": PROMPTS}))

    def greedy(model) -> list[list[int]]:
        with torch.inference_mode():
            return [model.generate(torch.tensor([ids]), max_new_tokens=a.gen_tokens, do_sample=False)[0, len(ids):].tolist()
                    for ids in prompts]

    ref = greedy(base)
    gen = {}
    for key in [k for k in files if k.endswith(("q8_0", "q4_k_m"))]:
        r = peer(a.peer_python, "generate", str(files[key][0]), str(req))
        same_file = lp.load(str(files[key][0]))
        hf = greedy(same_file)
        div = []
        for ids, c, h in zip(prompts, r["continuations"], hf):
            k = next((i for i, (x, y) in enumerate(zip(c, h)) if x != y), None)
            if k is None:
                div.append(None)
                continue
            with torch.inference_mode():
                lg = same_file(torch.tensor([ids + h[:k]])).logits[0, -1]
            div.append({"at": k, "transformers": h[k], "llama_cpp": c[k], "margin": float(lg[h[k]] - lg[c[k]])})
        gen[key] = {"same_as_transformers_same_file": [d is None for d in div], "divergence": div,
                    "same_as_transformers_base": [c == t for c, t in zip(r["continuations"], ref)],
                    "tokenization_same": [x == y for x, y in zip(r["tokenized"], prompts)],
                    "continuations": r["continuations"]}
        print(f"{key}: llama.cpp greedy == transformers on the same file: {gen[key]['same_as_transformers_same_file']} "
              f"{div}; == base: {gen[key]['same_as_transformers_base']}", flush=True)
        del same_file
    import gguf

    ra, rb = gguf.GGUFReader(files["llama.cpp q8_0"][0]), gguf.GGUFReader(files["llmpress q8_0"][0])
    da = {t.name: np.asarray(t.data).tobytes() for t in ra.tensors}
    q8_identical = all(np.asarray(t.data).tobytes() == da[t.name] for t in rb.tensors)
    print(f"Q8_0 tensor bytes identical to llama.cpp's: {q8_identical}", flush=True)

    # quality, read back with transformers' GGUF loader
    models = {k: lp.load(str(v[0])) for k, v in files.items()}
    res = lp.evaluate_many(models, base, n_windows=a.n_windows, paths={k: v[0] for k, v in files.items()})
    base_res = lp.evaluate(base, n_windows=a.n_windows, progress=False)
    rows = []
    for k, (p, f, tool, sec) in files.items():
        r = res[k]
        rows.append({"format": f, "tool": tool, "ppl": r.ppl, "kl": r.kl, "top1": r.top1,
                     "size_mb": p.stat().st_size / 1e6, "bits_per_weight": p.stat().st_size * 8 / r.params,
                     "quantize_seconds": sec})
    print(table(rows, [("format", "format"), ("tool", "tool"), ("ppl", "ppl"), ("kl", "KL"), ("top1", "top-1"),
                       ("size_mb", "size MB"), ("quantize_seconds", "seconds")]))
    blocks = []
    if not a.skip_blocks:
        real = {n: m.weight.detach().float() for n, m in base.named_modules() if n.endswith("mlp.down_proj")}
        blocks = block_errors(GGML(a.peer_python), real, imat)
    res_file = ROOT / "bench" / "results" / "export-smollm2-135m.json"
    res_file.write_text(json.dumps({
        "model": "smollm2-135m", "protocol": f"wiki eval, {a.n_windows} x 1024-token windows, KL vs fp32 base",
        "base_ppl": base_res.ppl, "imatrix": f"wiki calib, {a.imatrix_samples} x 512 tokens", "rows": rows,
        "tensor_types_vs_llama_cpp": type_check, "q8_0_bytes_identical_to_llama_cpp": q8_identical,
        "llama_cpp_generation": gen, "block_errors": blocks,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "command": "python bench/export.py " + " ".join(sys.argv[1:])}, indent=2))
    print(f"wrote {res_file}")


if __name__ == "__main__":
    main()
