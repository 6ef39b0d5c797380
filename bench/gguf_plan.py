"""Planned GGUF mixes against llama.cpp's fixed mixes at the same size, on smollm2-135m, under the
pinned protocol (DESIGN.md section 4).

For each llama.cpp mix (made by llama.cpp's own ``llama_model_quantize`` from the F32 GGUF that
llmpress writes), the bytes its block linears take set the budget; ``llmpress.plan.gguf``
measures every block linear at every GGML type that tiles its rows (one Fisher pass over 16 x 512
wiki tokens) and the knapsack picks the types; the file is written with the importance matrix
(64 x 512 wiki tokens), everything outside the blocks as the mix has it. Rows: llama.cpp's mix,
and the planned mix, evaluated on the same windows (llmpress's own mixes with the importance
matrix are rows of bench/export.py). Candidate types: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q5_0,
Q8_0; the affine legacy types Q4_1 / Q5_1 are left out by default because smollm2-135m's weights
sit on a Q4_1 grid, which Q5_1 reproduces almost exactly (--types to change).

    python bench/gguf_plan.py [--peer-python .llama-venv/bin/python] [--mixes q3_k_m,q4_k_m]

Writes bench/results/gguf-plan-smollm2-135m.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.export import FTYPES, peer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", default=str(ROOT / ".llama-venv" / "bin" / "python"))
    ap.add_argument("--mixes", default="q3_k_m,q4_k_m")
    ap.add_argument("--n-windows", type=int, default=24)
    ap.add_argument("--types", default="q2_k,q3_k,q4_k,q5_k,q6_k,q4_0,q5_0,q8_0")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench" / "gguf-plan"))
    a = ap.parse_args()
    import gguf

    import llmpress as lp
    from llmpress import calibrate
    from llmpress.eval.report import table
    from llmpress.plan import allocate
    from llmpress.plan.gguf import measure_gguf, plan_types

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = lp.load("smollm2-135m")
    tok = base.llmpress_tokenizer
    f32 = out / "f32.gguf"
    lp.export(base, f32, "gguf:f32", overwrite=True, progress=False)
    t0 = time.perf_counter()
    imat = calibrate.input_moments(base, lp.data.calibration("wiki", 64, 512).tokens(tok), progress=False)
    sens = measure_gguf(base, lp.data.calibration("wiki", 16, 512).tokens(tok), a.types.split(","),
                        name="smollm2-135m")
    measure_s = time.perf_counter() - t0
    sens.save(out / "gguf-sensitivity.json")
    params = sum(u.params for u in sens.units)
    names = {f"blk.{u.block}.{k}.weight": u.names[0] for u in sens.units
             for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
             if u.names[0].endswith({"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
                                     "attn_output": "o_proj", "ffn_gate": "gate_proj", "ffn_up": "up_proj",
                                     "ffn_down": "down_proj"}[k])}
    files, meta = {}, {}
    for mix in a.mixes.split(","):
        ref = out / f"llama.cpp-{mix}.gguf"
        peer(a.peer_python, "quantize", str(f32), str(ref), str(FTYPES[mix]))
        block_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(ref).tensors if t.name in names)
        bits = block_bytes * 8 / params
        p = allocate(sens, target_bits=bits)
        types = plan_types(p)
        planned = out / f"llmpress-plan-{mix}.gguf"
        lp.export(base, planned, f"gguf:{mix}", imatrix=imat, types=types, overwrite=True, progress=False)
        files[f"llama.cpp {mix}"] = (ref, mix, "llama.cpp")
        files[f"llmpress plan @ {mix} size"] = (planned, f"plan ({bits:.3f} bits/weight in blocks)", "llmpress plan + imatrix")
        meta[mix] = {"block_bits_per_weight": bits, "planned_types": dict(Counter(types.values())),
                     "predicted_kl_plan": p.kl, "types": types}
        print(mix, meta[mix]["planned_types"], flush=True)
    models = {k: lp.load(str(v[0])) for k, v in files.items()}
    res = lp.evaluate_many(models, base, n_windows=a.n_windows, paths={k: v[0] for k, v in files.items()})
    rows = [{"row": k, "format": v[1], "tool": v[2], "ppl": res[k].ppl, "kl": res[k].kl, "top1": res[k].top1,
             "size_mb": v[0].stat().st_size / 1e6} for k, v in files.items()]
    print(table(rows, [("row", "row"), ("ppl", "ppl"), ("kl", "KL"), ("top1", "top-1"), ("size_mb", "size MB")]))
    f = ROOT / "bench" / "results" / "gguf-plan-smollm2-135m.json"
    f.write_text(json.dumps({"model": "smollm2-135m", "rows": rows, "mixes": meta, "measure_seconds": measure_s,
                             "protocol": f"wiki eval, {a.n_windows} x 1024-token windows, KL vs fp32 base",
                             "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
                             "command": "python bench/gguf_plan.py " + " ".join(sys.argv[1:])}, indent=2))
    print(f"wrote {f}")


if __name__ == "__main__":
    main()
