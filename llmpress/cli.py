"""Command line: ``llmpress compress | eval | export | info``. Parsing and printing only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  llmpress compress smollm2-135m --recipe w4a16-gptq --group-size 64 -o out/w4 --eval
  llmpress compress ./my-llama --recipe my-recipe.yaml -o out/custom --device cuda
  llmpress eval out/w4 --base smollm2-135m --json eval.json
  llmpress export out/w4 --format gguf:q8_0 -o out/w4-q8_0.gguf
  llmpress info smollm2-135m

presets: w8a16, w4a16-rtn, w3a16-rtn, w4a16-gptq, w3a16-gptq, w8a16-gptq (group size 128
unless --group-size; -1 = per channel). MODEL is a local HF directory (safetensors), a .gguf
file, a hub id (online only) or a built-in asset (smollm2-135m).
"""

log = logging.getLogger("llmpress")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("llmpress", description="Compress, evaluate and inspect LLMs.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="compress a model with a recipe and save it",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model")
    c.add_argument("-r", "--recipe", default="w4a16-gptq", help="preset name or YAML/JSON file (default w4a16-gptq)")
    c.add_argument("-g", "--group-size", type=int, help="override the recipe's group size (-1: per channel)")
    c.add_argument("-o", "--output", required=True, help="output directory (compressed-tensors checkpoint)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    c.add_argument("--device", default=None, help="where blocks are calibrated: cpu, cuda, cuda:1 (default: model's)")
    c.add_argument("--calib", default="wiki", help="calibration corpus name or .txt file (default wiki)")
    c.add_argument("--n-samples", type=int, default=64)
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--eval", action="store_true", help="evaluate base vs compressed afterwards (pinned protocol)")
    c.add_argument("--n-windows", type=int, default=24, help="evaluation windows of --eval-seqlen tokens")
    c.add_argument("--eval-seqlen", type=int, default=1024)
    c.add_argument("--eval-corpus", default="wiki", help="evaluation corpus name or .txt file (default wiki)")
    c.add_argument("--json", help="write the report as JSON to this file")
    c.add_argument("--trust-remote-code", action="store_true")

    e = sub.add_parser("eval", help="perplexity, KL and top-1 vs a base model, size and bits",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model")
    e.add_argument("--base", help="reference model for KL and top-1 agreement")
    e.add_argument("--corpus", default="wiki")
    e.add_argument("--n-windows", type=int, default=24)
    e.add_argument("--seqlen", type=int, default=1024)
    e.add_argument("--device", default="cpu")
    e.add_argument("--kv-cache", action="append", default=[], metavar="SPEC",
                   help="also evaluate the model with its KV cache quantized: int8 | fp8, optionally -head "
                        "(default) or -token; repeatable")
    e.add_argument("--json", help="write results as JSON to this file")
    e.add_argument("--trust-remote-code", action="store_true")

    x = sub.add_parser("export", help="write a model for a serving engine: GGUF (llama.cpp) or compressed-tensors",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("model")
    x.add_argument("-f", "--format", default="gguf:q8_0",
                   help="gguf:TYPE (f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1) or compressed-tensors (default gguf:q8_0)")
    x.add_argument("-o", "--output", required=True, help="output file (.gguf) or directory (compressed-tensors)")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--json", help="write the export summary as JSON to this file")
    x.add_argument("--trust-remote-code", action="store_true")

    i = sub.add_parser("info", help="architecture, blocks, linear layers and quantization of a model")
    i.add_argument("model")
    i.add_argument("--trust-remote-code", action="store_true")
    return p


def _row(name: str, r, extra: dict | None = None, base_ppl: float | None = None) -> dict:
    d = {"name": name, **r.to_dict(), **(extra or {})}
    if base_ppl:
        d["delta_ppl_pct"] = 100 * (r.ppl / base_ppl - 1)
    return d


def _compress(a: argparse.Namespace) -> dict:
    import llmpress as lp
    from llmpress.eval.report import QUALITY_COLUMNS, table

    r = lp.recipe(a.recipe, group_size=a.group_size)
    # Check the output location before spending time on compression.
    out = Path(a.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not a.overwrite:
        raise FileExistsError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    model = lp.load(a.model, trust_remote_code=a.trust_remote_code)
    calib = lp.data.calibration(a.calib, a.n_samples, a.seqlen)
    rep = lp.compress(model, r, calib, device=a.device, batch_size=a.batch_size)
    for s in rep.structure:
        shown = {"removed blocks": s.get("removed") or None, "blocks": s.get("blocks_after"),
                 "intermediate size": s.get("intermediate_size"), "heads (q, kv)": s.get("heads"),
                 "kv heads": s.get("kv_heads_after"), "block sparsity": s.get("block_sparsity")}
        print(f"{s['step']}: " + ", ".join(f"{k} {v}" for k, v in shown.items() if v is not None))
    lp.save(model, out, overwrite=a.overwrite)
    log.info("compressed %d layers in %.1f s (peak RSS %.0f MB) -> %s", len(rep.layers), rep.seconds, rep.peak_rss_mb, out)
    result = {"recipe": r.to_dict(), "output": str(out), "compression": rep.to_dict()}
    if a.eval:
        base = lp.load(a.model, trust_remote_code=a.trust_remote_code)
        ev = lp.evaluate_many({"base": base, r.name: model}, base, source=a.eval_corpus, n_windows=a.n_windows,
                              seqlen=a.eval_seqlen, paths={r.name: out})
        rows = [_row("base", ev["base"]),
                _row(r.name, ev[r.name], {"seconds": rep.seconds, "peak_rss_mb": rep.peak_rss_mb}, ev["base"].ppl)]
        rows[0]["delta_ppl_pct"] = 0.0
        print(f"\n{a.model} -> {out}  ({ev['base'].tokens} tokens scored, {a.n_windows}x{a.eval_seqlen} "
              f"windows of {a.eval_corpus})\n")
        print(table(rows, QUALITY_COLUMNS))
        result["eval"] = rows
    else:
        print(f"saved {out} ({len(rep.layers)} layers, {rep.seconds:.1f} s, peak RSS {rep.peak_rss_mb:.0f} MB)")
    return result


def _eval(a: argparse.Namespace) -> dict:
    import llmpress as lp
    from llmpress.eval.report import QUALITY_COLUMNS, table

    model = lp.load(a.model, trust_remote_code=a.trust_remote_code)
    base = lp.load(a.base, trust_remote_code=a.trust_remote_code) if a.base else None
    from llmpress.quant.kvcache import KVScheme

    models = {"model": model} if base is None else {"base": base, "model": model}
    kv = {f"model+kv-{spec}": KVScheme.parse(spec) for spec in a.kv_cache}
    models.update({k: model for k in kv})
    path = Path(a.model) if Path(a.model).is_dir() else None
    ev = lp.evaluate_many(models, base, source=a.corpus, n_windows=a.n_windows, seqlen=a.seqlen, device=a.device,
                          paths={k: path for k in models if k != "base"} if path else None, kv_cache=kv)
    base_ppl = ev["base"].ppl if base is not None else None
    rows = [_row(k, v, base_ppl=base_ppl) for k, v in ev.items()]
    print(table(rows, [c for c in QUALITY_COLUMNS if c[0] not in ("seconds", "peak_rss_mb")]))
    return {"model": a.model, "base": a.base, "rows": rows}


def _export(a: argparse.Namespace) -> dict:
    import llmpress as lp

    kind = a.format.partition(":")[0]
    if kind not in ("gguf", "compressed-tensors"):  # before loading the model
        raise ValueError(f"unknown export format {a.format!r}; allowed: gguf:<type>, compressed-tensors")
    out = Path(a.output)
    if out.exists() and not a.overwrite and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"output {out} exists; pass --overwrite to replace it")
    model = lp.load(a.model, trust_remote_code=a.trust_remote_code)
    s = lp.export(model, out, a.format, overwrite=a.overwrite)
    fb = s.get("fallback") or {}
    print(f"wrote {s['file']} ({s['type']}" + (f", {s['size_mb']:.1f} MB" if "size_mb" in s else "") + ")"
          + (f"; {len(fb)} tensors fell back: " + ", ".join(f"{k} {v}" for k, v in fb.items()) if fb else ""))
    return s


def _info(a: argparse.Namespace) -> dict:
    import llmpress as lp
    from llmpress.eval.ppl import model_size
    from llmpress.models import block_linears, find_blocks
    from llmpress.nn import CompressedLinear

    model = lp.load(a.model, trust_remote_code=a.trust_remote_code)
    name, blocks = find_blocks(model)
    lin = block_linears(blocks[0])
    size, bpw, params = model_size(model)
    nq = sum(isinstance(m, CompressedLinear) for m in model.modules())
    print(f"model        {type(model).__name__} ({model.config.model_type})")
    print(f"parameters   {params / 1e6:.1f} M, {size:.1f} MB as stored")
    print(f"blocks       {len(blocks)} at '{name}'")
    print("block linears " + ", ".join(f"{n} [{m.in_features if hasattr(m, 'in_features') else m.weight.shape[0]}]" for n, m in lin.items()))
    print(f"quantized    {nq} linear layers" + (f", {bpw:.2f} bits/weight" if bpw else ""))
    return {"model": type(model).__name__, "blocks": len(blocks), "block_path": name, "linears": list(lin),
            "params": params, "size_mb": size, "quantized_layers": nq, "bits_per_weight": bpw}


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "compressed_tensors"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    t0 = time.perf_counter()
    try:
        result = {"compress": _compress, "eval": _eval, "export": _export, "info": _info}[a.cmd](a)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError) as ex:
        print(f"llmpress {a.cmd}: error: {ex}", file=sys.stderr)
        return 2
    if getattr(a, "json", None):
        result["wall_seconds"] = time.perf_counter() - t0
        Path(a.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
