"""Quantization methods side by side on smollm2-135m under the pinned protocol (DESIGN.md §4):
llmpress's RTN / AWQ / GPTQ / AWQ+GPTQ / HQQ / NF4 / FP4 / FP8 / W8A8 (SmoothQuant) / mixed
recipes, and the peers that made each method famous, evaluated on the same windows against the
same base in one run.

    python bench/methods.py [--n-windows 24] [--rows a,b] [--peers DIR]

Each llmpress row is compressed in this process (wall time of ``llmpress.compress``, nothing
else running), saved, read back (``reload_exact``: identical logits on a test batch) and the
read-back checkpoint is evaluated. ``--peers DIR`` adds the peer results written by
bench/peers/quantize_peers.py (hqq, bitsandbytes: dequantized fp32 checkpoints + peer.json) and
bench/peers/llmcompressor_run.py (compressed-tensors checkpoints + peer.json); bench/peers/run.sh
runs all three. Writes bench/results/methods-smollm2-135m.json and
bench/results/peers-smollm2-135m.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch

import llmpress as lp
from llmpress.eval.report import table

ROOT = Path(__file__).resolve().parents[1]

MIXED = {"name": "mixed-attn8-mlp4-edges8", "steps": [{
    "method": "gptq", "bits": 4, "group_size": 64, "observer": "mse",
    "overrides": [{"pattern": "re:model\\.layers\\.(0|29)\\..*", "bits": 8, "group_size": -1},
                  {"pattern": "re:.*self_attn\\..*", "bits": 8, "group_size": -1}]}]}
W8A8_NOSMOOTH = {"name": "int8-w8a8-gptq-nosmooth", "steps": [{
    "method": "gptq", "bits": 8, "group_size": -1, "observer": "mse", "act_bits": 8}]}

# row name -> preset or recipe dict, keyword overrides
ROWS: dict[str, tuple] = {
    "rtn-w4-g64": ("w4a16-rtn", {}),
    "awq-w4-g64": ("w4a16-awq", {}),
    "awq-w4-g64-asym": ("w4a16-awq", {"symmetric": False}),  # llmcompressor's AWQ scheme (zero points)
    "gptq-w4-g64": ("w4a16-gptq", {}),
    "awq-gptq-w4-g64": ("w4a16-awq-gptq", {}),
    "rtn-w3-g64": ("w3a16-rtn", {}),
    "awq-w3-g64": ("w3a16-awq", {}),
    "gptq-w3-g64": ("w3a16-gptq", {}),
    "awq-gptq-w3-g64": ("w3a16-awq-gptq", {}),
    # HQQ with groups of input columns (rows "-in") and of output rows (HQQ's axis=0, "-out")
    **{f"hqq-w{b}-g64-{x}": (f"w{b}a16-hqq", {"group_axis": int(x == "in")}) for b in (4, 3, 2, 8) for x in ("in", "out")},
    "hqq-w4-g64-in-intzero": ("w4a16-hqq", {"float_zero": False, "group_axis": 1}),
    "nf4-b64-dq": ("nf4", {}),
    "fp4-b64-dq": ("fp4", {}),
    "fp8-w8a8-dynamic": ("w8a8-fp8", {}),
    "int8-w8a8-smoothquant-gptq": ("w8a8-int8", {}),
    "int8-w8a8-gptq-nosmooth": (W8A8_NOSMOOTH, {}),
    "int8-w8a8-static-smoothquant-gptq": ("w8a8-int8-static", {}),
    "mixed-attn8-mlp4-edges8": (MIXED, {}),
}
# peer row -> the llmpress row doing the same method at the same bits and group size
PAIRS = {
    **{f"hqq-w{b}-g64-axis{x}": f"hqq-w{b}-g64-{'out' if x == 0 else 'in'}" for b in (2, 3, 4, 8) for x in (0, 1)},
    "gptqmodel-gptq-w4-g64": "gptq-w4-g64", "gptqmodel-gptq-w3-g64": "gptq-w3-g64",
    "bnb-nf4-b64-dq": "nf4-b64-dq", "bnb-fp4-b64-dq": "fp4-b64-dq",
    "lc-rtn-w4-g64": "rtn-w4-g64", "lc-gptq-w4-g64": "gptq-w4-g64", "lc-gptq-w3-g64": "gptq-w3-g64",
    "lc-awq-w4-g64": "awq-w4-g64-asym", "lc-smoothquant-gptq-w8a8": "int8-w8a8-smoothquant-gptq",
    "lc-fp8-dynamic": "fp8-w8a8-dynamic",
}


def _recipe(spec, kw) -> lp.Recipe:
    if isinstance(spec, dict):
        return lp.Recipe.from_dict(spec, name=spec["name"])
    return lp.recipe(spec, **({"group_size": 64} if not spec.startswith("w8a8") else {}), **kw)


def _step_row(name: str, r: lp.Recipe) -> dict:
    s = r.steps[0]
    return {"tool": "llmpress", "recipe": name, "method": s.describe(), "bits": s.bits,
            "group_size": s.group_size if s.group_size not in (None, -1) else -1,
            "act": None if s.act_scheme() is None else s.act_scheme().describe()}


def _peer_rows(peers: Path) -> dict[str, dict]:
    out = {}
    for d in sorted(p for p in peers.rglob("peer.json")):
        info = json.loads(d.read_text())
        out[d.parent.name] = {"dir": d.parent, **info}
    return out


def _size_of_dequantized(model, bits_per_weight: float) -> float:
    """MB the peer's format takes: quantized block linears at its bits/weight, the rest fp32."""
    total = 0.0
    seen = set()
    for n, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        q = ".layers." in n and n.endswith("proj.weight")
        total += p.numel() * (bits_per_weight / 8 if q else p.element_size())
    return total / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-windows", type=int, default=24)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--peers", default=None)
    ap.add_argument("--out", default=str(ROOT / "out" / "methods"))
    ap.add_argument("--chunk", type=int, default=7, help="models evaluated per pass over the windows (memory)")
    ap.add_argument("--tag", default="", help="suffix for the result file names (a partial re-run)")
    ap.add_argument("--peer-quality-from", default=None,
                    help="a peers JSON of an earlier run: reuse its peer ppl/KL (peer quantizers are deterministic) "
                         "and re-measure only the peers' times")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = lp.load("smollm2-135m")
    tok = base.llmpress_tokenizer
    calib = lp.data.Calibration("wiki", n_samples=64, seqlen=512).tokens(tok)
    probe = calib[:2, :64]

    rows: dict[str, dict] = {}
    for name in [r for r in a.rows.split(",") if r]:
        spec, kw = ROWS[name]
        r = _recipe(spec, kw)
        m = lp.load("smollm2-135m")
        t0 = time.perf_counter()
        rep = lp.compress(m, r, calib, progress=False)
        sec = time.perf_counter() - t0
        lp.save(m, out / name, overwrite=True)
        back = lp.load(out / name)
        with torch.no_grad():
            exact = torch.equal(back(probe).logits, m(probe).logits)
        rows[name] = {**_step_row(name, r), "seconds": sec, "peak_rss_mb": rep.peak_rss_mb, "reload_exact": exact,
                      "dir": out / name, "command": f"python bench/methods.py --rows {name}"}
        print(f"{name}: {sec:.1f}s reload_exact={exact}", flush=True)
        del m, back
        gc.collect()

    peers = _peer_rows(Path(a.peers)) if a.peers else {}

    # evaluation, a chunk of models per pass over the windows (base log-probs once per pass)
    results = {}
    if a.peer_quality_from:
        old = {r["name"]: r for r in json.loads(Path(a.peer_quality_from).read_text())["rows"] if r["tool"] != "llmpress"}
        for k in peers:
            if k in old:
                results[k] = {x: old[k][x] for x in ("ppl", "kl", "top1", "size_mb")}
    for k, v in peers.items():  # evaluated in the peer's own environment with llmpress.eval (bnb LLM.int8)
        if v.get("evaluated_in_peer_env") and "error" not in v:
            results[k] = {x: v[x] for x in ("ppl", "kl", "top1", "size_mb")}
    todo = [(k, "ours") for k in rows] + [(k, "peer") for k, v in peers.items() if "error" not in v and k not in results]
    for i in range(0, len(todo), a.chunk):
        chunk = todo[i : i + a.chunk]
        models, paths = {}, {}
        for k, kind in chunk:
            d = rows[k]["dir"] if kind == "ours" else peers[k]["dir"]
            models[k] = lp.load(d)
            if kind == "ours" or (d / "config.json").read_text().find("compressed-tensors") >= 0:
                paths[k] = d
        ev = lp.evaluate_many(models, base, tokenizer=tok, n_windows=a.n_windows, paths=paths, progress=False)
        for k, kind in chunk:
            r = ev[k]
            size = r.size_mb
            if kind == "peer" and k not in paths:
                size = _size_of_dequantized(models[k], peers[k]["bits_per_weight"])
            results[k] = {"ppl": r.ppl, "kl": r.kl, "top1": r.top1, "size_mb": size}
            print(f"eval {k}: ppl {r.ppl:.3f} kl {r.kl:.4f}", flush=True)
        del models, ev
        gc.collect()
    # KV-cache quantization on the base model: the same weights, keys/values rounded in the cache
    from llmpress.quant.kvcache import KVScheme

    kv = {f"base+kv-{s}": KVScheme.parse(s) for s in (("int8", "int8-token", "fp8", "fp8-token") if not a.tag else ())}
    ev = lp.evaluate_many({"base": base, **{k: base for k in kv}}, base, tokenizer=tok, n_windows=a.n_windows,
                          progress=False, kv_cache=kv)
    base_ppl = ev["base"].ppl
    kv_rows = [{"recipe": k, "kv_cache": kv[k].describe(), "ppl": ev[k].ppl, "kl": ev[k].kl, "top1": ev[k].top1,
                "delta_ppl_pct": 100 * (ev[k].ppl / base_ppl - 1)} for k in kv]

    # transformers reads our compressed-tensors checkpoints with the same perplexity
    from transformers import AutoModelForCausalLM

    tf_check = {}
    for k in ("awq-gptq-w4-g64", "int8-w8a8-smoothquant-gptq", "fp8-w8a8-dynamic"):
        if k in rows and not a.tag:
            hf = AutoModelForCausalLM.from_pretrained(rows[k]["dir"], dtype=torch.float32)
            p = lp.evaluate(hf, tokenizer=tok, n_windows=a.n_windows, progress=False).ppl
            tf_check[k] = {"llmpress_ppl": results[k]["ppl"], "transformers_ppl": p,
                           "rel_diff": abs(p / results[k]["ppl"] - 1)}
            del hf

    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
    ours = []
    for k, r in rows.items():
        ours.append({**{x: y for x, y in r.items() if x != "dir"}, **results[k],
                     "delta_ppl_pct": 100 * (results[k]["ppl"] / base_ppl - 1)})
    meta = {"model": "smollm2-135m", "protocol": f"wiki eval, {a.n_windows}x1024 tokens; calib 64x512 seed 0; fp32 CPU",
            "machine": machine, "date": time.strftime("%Y-%m-%d"), "base_ppl": base_ppl}
    (ROOT / "bench" / "results" / f"methods-smollm2-135m{a.tag}.json").write_text(
        json.dumps({**meta, "rows": ours, "kv_cache_rows": kv_rows, "transformers_check": tf_check}, indent=2, default=str))
    cols = [("recipe", "recipe"), ("method", "method"), ("act", "activations"), ("ppl", "ppl"),
            ("delta_ppl_pct", "Δppl %"), ("kl", "KL"), ("top1", "top-1"), ("size_mb", "size MB"),
            ("seconds", "compress s"), ("reload_exact", "reload exact")]
    print(f"base ppl {base_ppl:.3f}")
    print(table(ours, cols))
    print(table(kv_rows, [("recipe", "model"), ("kv_cache", "KV cache"), ("ppl", "ppl"), ("delta_ppl_pct", "Δppl %"),
                          ("kl", "KL"), ("top1", "top-1")]))
    print(json.dumps(tf_check, indent=2))

    if peers:
        prow = []
        for k, v in peers.items():
            row = {"tool": v["tool"], "version": v.get("version"), "method": v["method"], "bits": v["bits"],
                   "group_size": v["group_size"], "name": k, "seconds": v.get("seconds"), "error": v.get("error")}
            row.update(results.get(k, {"ppl": None, "kl": None, "top1": None, "size_mb": None}))
            ours_k = PAIRS.get(k)
            if ours_k in rows:
                row["llmpress_row"] = ours_k
                row["llmpress_kl"] = results[ours_k]["kl"]
                row["kl_no_worse"] = None if row["kl"] is None else results[ours_k]["kl"] <= row["kl"]
                row["time_ratio"] = rows[ours_k]["seconds"] / v["seconds"] if v.get("seconds") else None
            prow.append(row)
        for k in rows:
            prow.append({"tool": "llmpress", "version": lp.__version__ if hasattr(lp, "__version__") else "main",
                         "method": rows[k]["method"], "bits": rows[k]["bits"], "group_size": rows[k]["group_size"],
                         "name": k, "seconds": rows[k]["seconds"], "error": None, **results[k]})
        (ROOT / "bench" / "results" / f"peers-smollm2-135m{a.tag}.json").write_text(
            json.dumps({**meta, "rows": prow}, indent=2, default=str))
        pc = [("tool", "tool"), ("name", "row"), ("ppl", "ppl"), ("kl", "KL"), ("top1", "top-1"),
              ("size_mb", "size MB"), ("seconds", "quantize s"), ("llmpress_row", "llmpress row"),
              ("llmpress_kl", "llmpress KL"), ("kl_no_worse", "KL ≤ peer"), ("time_ratio", "time ratio"),
              ("error", "error")]
        print(table(prow, pc))


if __name__ == "__main__":
    main()
