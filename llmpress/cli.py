"""Command line: ``llmpress compress | eval | export | info | recover | generate | bench-speed | plan | compare``.
Parsing and printing only."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  llmpress compress smollm2-135m --recipe w4a16-gptq --group-size 64 -o out/w4 --eval
  llmpress compress ./my-llama --recipe my-recipe.yaml -o out/custom --device cuda
  llmpress eval out/w4 --base smollm2-135m --json eval.json
  llmpress export out/w4 --format gguf:q8_0 -o out/w4-q8_0.gguf
  llmpress export out/w4 --format gguf:q4_k_m --imatrix -o out/w4-q4_k_m.gguf   # llama.cpp mix, importance-weighted
  llmpress export out/w4 --format onnx:int4 -o out/w4-onnx   # onnxruntime, KV cache, GPTQ integers kept
  llmpress info smollm2-135m
  llmpress recover out/w4 --base smollm2-135m -o out/w4-adapter --steps 200 --eval
  llmpress recover out/w3 --base smollm2-135m --method qat --learn-scales -o out/w3-qat --eval
  llmpress recover out/drop25 --base smollm2-135m --method full --hidden-weight 1 --lr 5e-5 -o out/drop25-kd
  llmpress generate out/w4 -p "The capital of France is" -n 32
  llmpress bench-speed out/w4 --device cuda --baseline

presets: w8a16, w4a16-rtn, w3a16-rtn, w4a16-gptq, w3a16-gptq, w8a16-gptq (group size 128
unless --group-size; -1 = per channel). MODEL is a local HF directory (safetensors), a .gguf
file, a hub id (online only) or a built-in asset (smollm2-135m).
"""

PLAN_EXAMPLES = """examples:
  llmpress plan smollm2-135m --target-bits 3.5 -o plan.yaml --sensitivity sens.json
  llmpress plan smollm2-135m --target-size 180MB -o plan.yaml --sensitivity sens.json   # reuses the measurement
  llmpress plan smollm2-135m --max-kl 0.2 -o plan.yaml --sensitivity sens.json
  llmpress compress smollm2-135m --recipe plan.yaml -o out/plan --eval
"""

log = logging.getLogger("llmpress")
FIT_SAMPLES = 0  # plan: calibration samples the candidate solvers fit on, besides the scored ones


def parse_size(s: str) -> float:
    """'150MB', '4.5GB', '1.2G', '800M', '2TB' or a plain number of MB -> MB (decimal units)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)I?B?\s*", s.upper())
    if not m:
        raise ValueError(f"size {s!r} not understood; write e.g. 150MB or 4.5GB")
    return float(m.group(1)) * {"K": 1e-3, "": 1.0, "M": 1.0, "G": 1e3, "T": 1e6}[m.group(2)]


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
    c.add_argument("--dry-run", action="store_true", help="predict peak memory, size and time from config.json and stop")
    c.add_argument("--force", action="store_true", help="run even when the predicted peak memory exceeds what is free")
    c.add_argument("--trust-remote-code", action="store_true")
    c.add_argument("--stream", action="store_true",
                   help="read one block at a time from the safetensors shards and write each compressed block "
                        "as it is done (models bigger than memory); resumes an interrupted run")
    c.add_argument("--no-resume", action="store_true", help="with --stream: start over even if a partial run exists")
    c.add_argument("--gpus", type=int, default=1,
                   help="with --stream: calibrate on N GPUs of this host (relaunches itself under torchrun; "
                        "or run `torchrun --nproc-per-node N -m llmpress compress ... --stream`)")
    c.add_argument("--activations", choices=("auto", "gpu", "host"), default="auto",
                   help="with --stream on a GPU: keep calibration activations there, on the host, or decide by size")
    c.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="with --stream: compute and storage dtype (default: the checkpoint's)")

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
                   help="gguf:TYPE: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1, or a K-quant mix as llama.cpp names "
                        "them: q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k; compressed-tensors; "
                        "onnx[:float32|int4] (onnxruntime, KV cache; int4: 4-bit MatMulNBits, int8 embeddings) (default gguf:q8_0)")
    x.add_argument("-o", "--output", required=True, help="output file (.gguf) or directory (onnx, compressed-tensors)")
    x.add_argument("--imatrix", action="store_true",
                   help="GGUF: weigh each column's rounding error by its mean squared input on calibration text "
                        "(llama.cpp's importance matrix, computed here)")
    x.add_argument("--calib", default="wiki", help="calibration text for --imatrix (default wiki)")
    x.add_argument("--n-samples", type=int, default=64, help="calibration samples for --imatrix (default 64)")
    x.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sample (default 512)")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--json", help="write the export summary as JSON to this file")
    x.add_argument("--trust-remote-code", action="store_true")

    gen = sub.add_parser("generate", help="generate text with the static-cache / CUDA-graph runtime",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("model")
    gen.add_argument("-p", "--prompt", required=True)
    gen.add_argument("-n", "--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--draft", help="draft model for speculative decoding (same tokenizer; greedy only)")
    gen.add_argument("--spec-k", type=int, default=4, help="tokens the draft proposes per step")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _runtime_args(gen)

    bs = sub.add_parser("bench-speed", help="prefill / decode tokens/s, time to first token, peak GPU memory",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    bs.add_argument("model")
    bs.add_argument("--prompt-len", type=int, default=128)
    bs.add_argument("--new-tokens", type=int, default=128)
    bs.add_argument("--repeats", type=int, default=3)
    bs.add_argument("--baseline", action="store_true", help="also time transformers' eager generate")
    bs.add_argument("--json", help="write results as JSON to this file")
    _runtime_args(bs)

    rc = sub.add_parser("recover", help="recover a compressed model by distillation from the original: LoRA / QLoRA, "
                        "quantization-aware training, or full training of a smaller student",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    rc.add_argument("model", help="the compressed model")
    rc.add_argument("--base", required=True, help="the original model: the teacher")
    rc.add_argument("-o", "--output", required=True, help="adapter directory (PEFT layout; lora), or the model "
                    "(lora --merge, qat: the integer model, full)")
    rc.add_argument("--method", default="lora", choices=["lora", "qat", "full"],
                    help="lora: adapters on the frozen model (QLoRA on quantized weights); qat: fine-tune the "
                    "quantized weights through their grid (straight-through) and save the integer model; full: "
                    "train every weight (a dense student, e.g. after drop_blocks / shrink)")
    rc.add_argument("--merge", action="store_true", help="lora: merge the adapters into dense weights and save the model")
    rc.add_argument("--requant", action="store_true", help="lora --merge: re-compress the merged model with the "
                    "recipe it was compressed with (llmpress_recipe.json); --eval reports what that costs")
    rc.add_argument("--learn-scales", action="store_true", help="qat: train the scales too")
    rc.add_argument("--scales-only", action="store_true", help="qat: train the scales alone, the integers fixed")
    rc.add_argument("--scale-lr-ratio", type=float, default=0.3, help="qat: learning rate of the scales / --lr")
    rc.add_argument("--hidden-weight", type=float, default=0.0, help="add hidden-state matching (normalised MSE "
                    "per block; a block-pruned student is matched to the teacher blocks it kept) with this weight")
    rc.add_argument("--teacher-cache", help="directory of the teacher's cached top-k logits: built there first "
                    "(teacher loaded only for that) or reused when it exists")
    rc.add_argument("--device", default="cpu", help="train here (cuda: the model and teacher in bf16; QLoRA keeps "
                    "only the packed codes on the GPU)")
    rc.add_argument("--topk", type=int, default=64, help="logits per token kept in --teacher-cache (default 64)")
    rc.add_argument("--steps", type=int, default=100)
    rc.add_argument("--lr", type=float, help="learning rate (default: lora 1e-3; qat 1e-2, in grid steps per "
                    "step for the integers and relative change for the scales; full 5e-5)")
    rc.add_argument("--rank", type=int, default=16)
    rc.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    rc.add_argument("--targets", help="comma-separated linear names to adapt (default: every linear in the blocks)")
    rc.add_argument("--batch-size", type=int, default=4)
    rc.add_argument("--grad-accum", type=int, default=1)
    rc.add_argument("--seqlen", type=int, default=256)
    rc.add_argument("--kd", default="forward", choices=["forward", "reverse", "none"])
    rc.add_argument("--temperature", type=float, default=1.0)
    rc.add_argument("--ce-weight", type=float, default=0.0, help="add the causal-LM loss with this weight")
    rc.add_argument("--data", default="wiki", help="training data: corpus name (its calibration split), .txt file, "
                    "or .jsonl (alpaca instruction/input/output or chat messages; prompt tokens are not trained)")
    rc.add_argument("--format", default="auto", choices=["auto", "alpaca", "chat"], help="JSONL record format")
    rc.add_argument("--on-error", default="skip", choices=["skip", "raise"], help="malformed JSONL lines: skip (logged) or stop")
    rc.add_argument("--checkpoint", help="checkpoint directory (resumed from when it exists)")
    rc.add_argument("--save-every", type=int, default=0)
    rc.add_argument("--eval", action="store_true", help="perplexity and KL before and after (pinned protocol)")
    rc.add_argument("--n-windows", type=int, default=24)
    rc.add_argument("--overwrite", action="store_true")
    rc.add_argument("--json", help="write the report as JSON to this file")
    rc.add_argument("--trust-remote-code", action="store_true")

    pl = sub.add_parser("plan", help="choose bits per layer for a size / bits / KL budget and write the recipe",
                        epilog=PLAN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("model")
    goal = pl.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-bits", type=float, help="average bits per planned weight, scales included (e.g. 3.5)")
    goal.add_argument("--target-size", help="whole checkpoint size, e.g. 150MB or 4.5GB")
    goal.add_argument("--max-kl", type=float, help="the smallest plan whose predicted KL (nats/token) is at most this")
    pl.add_argument("-o", "--output", required=True, help="recipe YAML to write")
    pl.add_argument("--preset", default="w4a16-gptq", help="the step whose bits and group size are planned "
                    "(a weight-only rtn / gptq / hqq preset or recipe file; default w4a16-gptq)")
    pl.add_argument("--bits", default="2,3,4,8", help="candidate bit widths (default 2,3,4,8)")
    pl.add_argument("--group-sizes", default="32,64,128,-1", help="candidate group sizes; -1 = per channel")
    pl.add_argument("--asym-bits", default="", help="bit widths at which a symmetric preset's asymmetric form "
                    "(integer zero points) is a candidate too, e.g. 2 or 2,3 (default: none)")
    pl.add_argument("--calib", default="wiki")
    pl.add_argument("--n-samples", type=int, default=16, help="calibration samples the errors are scored on "
                    "(forward + backward)")
    pl.add_argument("--fit-samples", type=int, default=FIT_SAMPLES, help="further calibration samples the candidate "
                    "solvers fit on (forward only); 0 = fit on the scoring samples")
    pl.add_argument("--direct-samples", type=int, default=0, help="measure each candidate's real output KL on this "
                    "many of the scoring samples (one forward of the later blocks per candidate) instead of "
                    "trusting the second-order estimate; 0 = estimate only")
    pl.add_argument("--seqlen", type=int, default=512)
    pl.add_argument("--batch-size", type=int, default=2)
    pl.add_argument("--sensitivity", help="JSON file: reused when it exists (re-plan in seconds), written otherwise")
    pl.add_argument("--overwrite", action="store_true")
    pl.add_argument("--json", help="write the plan summary and per-layer choices as JSON")
    pl.add_argument("--trust-remote-code", action="store_true")

    cm = sub.add_parser("compare", help="compress with several recipes, evaluate all, write a report (md, json, html, PNG)",
                        epilog=PLAN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    cm.add_argument("model")
    cm.add_argument("--recipes", required=True, help="comma-separated presets or recipe files")
    cm.add_argument("-o", "--output", required=True, help="report directory")
    cm.add_argument("-g", "--group-size", type=int)
    cm.add_argument("--n-windows", type=int, default=24)
    cm.add_argument("--seqlen", type=int, default=1024)
    cm.add_argument("--corpus", default="wiki")
    cm.add_argument("--calib", default="wiki")
    cm.add_argument("--n-samples", type=int, default=64)
    cm.add_argument("--device", default=None)
    cm.add_argument("--keep-models", action="store_true", help="keep the compressed checkpoints under OUTPUT/models")
    cm.add_argument("--overwrite", action="store_true")
    cm.add_argument("--json", help="also write the report JSON here")

    i = sub.add_parser("info", help="architecture, blocks, linear layers and quantization of a model")
    i.add_argument("model")
    i.add_argument("--trust-remote-code", action="store_true")
    return p


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="activation / dense-weight dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly")
    p.add_argument("--compile", action="store_true",
                   help="decode step through torch.compile (fuses norms / rotary / activations; compiles once, "
                        "~1-3 min for an 8B model; 1.30x bf16 and 1.52x W4 tokens/s on an H100, BENCHMARKS.md)")
    p.add_argument("--no-fuse", action="store_true",
                   help="keep q/k/v and gate/up as separate matmuls (fused by default on a GPU: llmpress.fuse)")
    p.add_argument("--max-len", type=int, default=None, help="static KV cache length (default: what the run needs)")
    p.add_argument("--trust-remote-code", action="store_true")


def _load_for_runtime(a: argparse.Namespace, src: str):
    import torch

    import llmpress as lp

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {dev}: no CUDA GPU is available here (use --device cpu)")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    return lp.load(src, dtype=dtype, device=dev, trust_remote_code=a.trust_remote_code)


def _generate(a: argparse.Namespace) -> dict:
    from llmpress.runtime import Runtime, SpeculativeRuntime

    model = _load_for_runtime(a, a.model)
    tok = model.llmpress_tokenizer
    if a.chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{a.model}: the tokenizer has no chat template; drop --chat")
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = a.prompt
    ids = tok(text, return_tensors="pt").input_ids
    max_len = a.max_len or ids.shape[1] + a.max_new_tokens
    eos = tok.eos_token_id
    if a.draft:
        if a.temperature > 0:
            raise ValueError("speculative decoding here is greedy only; drop --temperature")
        rt = SpeculativeRuntime(model, _load_for_runtime(a, a.draft), k=a.spec_k, max_len=max_len,
                                cuda_graph=not a.no_cuda_graph)
        out, st = rt.generate(ids, a.max_new_tokens, eos_token_id=eos)
    else:
        rt = Runtime(model, max_len=max_len, cuda_graph=not a.no_cuda_graph, compile=a.compile,
                     fuse=False if a.no_fuse else None)
        out, st = rt.generate(ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                              eos_token_id=eos, seed=a.seed)
    completion = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(completion)
    print(f"-- {st.new_tokens + 1} tokens, prefill {st.prefill_tps:.1f} tok/s, decode {st.decode_tps:.1f} tok/s"
          + (f", {st.accepted_per_step:.2f} tokens per target step" if st.accepted_per_step else ""), file=sys.stderr)
    return {"completion": completion, **st.as_dict()}


def _bench_speed(a: argparse.Namespace) -> dict:
    import statistics

    import torch

    from llmpress.runtime import Runtime

    model = _load_for_runtime(a, a.model)
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, a.prompt_len), generator=g)
    rt = Runtime(model, max_len=a.max_len or a.prompt_len + a.new_tokens, cuda_graph=not a.no_cuda_graph,
                 compile=a.compile, fuse=False if a.no_fuse else None)
    rt.generate(ids, min(a.new_tokens, 8))  # warm-up: graph capture, kernel autotuning
    runs = [rt.generate(ids, a.new_tokens)[1] for _ in range(a.repeats)]
    med = (lambda f: statistics.median(f(r) for r in runs))  # noqa: E731
    res = {"model": a.model, "device": str(dev), "dtype": str(next(model.parameters()).dtype),
           "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "cuda_graph": rt.cuda_graph,
           "prefill_tokens_per_s": med(lambda r: r.prefill_tps), "decode_tokens_per_s": med(lambda r: r.decode_tps),
           "ttft_ms": med(lambda r: r.ttft_s * 1e3), "peak_mem_mb": runs[-1].peak_mem_mb}
    rows = [("llmpress runtime", res["prefill_tokens_per_s"], res["decode_tokens_per_s"], res["ttft_ms"])]
    if a.baseline:
        from llmpress.fuse import unfuse_projections

        unfuse_projections(model)  # the baseline is transformers' own model, projections separate
        times = []
        with torch.inference_mode():
            for _ in range(a.repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                model.generate(ids.to(dev), max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t0)
        res["baseline_eager_tokens_per_s"] = a.new_tokens / statistics.median(times)
        res["speedup_vs_eager"] = res["decode_tokens_per_s"] / res["baseline_eager_tokens_per_s"]
        rows.append(("transformers eager generate (whole call)", float("nan"), res["baseline_eager_tokens_per_s"], float("nan")))
    print(f"{'runtime':42s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'TTFT ms':>9s}")
    for name, pf, dc, tt in rows:
        print(f"{name:42s} {pf:14.1f} {dc:13.1f} {tt:9.1f}")
    if res["peak_mem_mb"] is not None:
        print(f"peak GPU memory {res['peak_mem_mb']:.0f} MB")
    return res


def _row(name: str, r, extra: dict | None = None, base_ppl: float | None = None) -> dict:
    d = {"name": name, **r.to_dict(), **(extra or {})}
    if base_ppl:
        d["delta_ppl_pct"] = 100 * (r.ppl / base_ppl - 1)
    return d


def _compress(a: argparse.Namespace) -> dict:
    import llmpress as lp
    from llmpress.eval.report import QUALITY_COLUMNS, table

    from llmpress.plan.resources import check_fits, predict

    r = lp.recipe(a.recipe, group_size=a.group_size)
    # Check the output location and the memory before spending time on compression.
    out = Path(a.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not a.overwrite and not a.dry_run:
        raise FileExistsError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    pred = predict(a.model, r, n_samples=a.n_samples, seqlen=a.seqlen, batch_size=a.batch_size,
                   device=a.device or "cpu", trust_remote_code=a.trust_remote_code,
                   calib_chars=None if a.calib == "wiki" else _calib_chars(a.calib))
    if a.dry_run:
        print(f"dry run: {a.model} with {r.name} ({a.n_samples} x {a.seqlen} calibration tokens, batch {a.batch_size})")
        for line in pred.lines():
            print("  " + line)
        return {"recipe": r.to_dict(), "prediction": pred.to_dict()}
    if a.stream:
        return _compress_stream(a, r, out, pred)
    if not a.force:
        check_fits(pred)
    model = lp.load(a.model, trust_remote_code=a.trust_remote_code)
    calib = lp.data.calibration(a.calib, a.n_samples, a.seqlen)
    rep = lp.compress(model, r, calib, device=a.device, batch_size=a.batch_size)
    for s in rep.structure:
        shown = {"removed blocks": s.get("removed") or None, "blocks": s.get("blocks_after"),
                 "intermediate size": s.get("intermediate_size"), "heads (q, kv)": s.get("heads"),
                 "kv heads": s.get("kv_heads_after"), "block sparsity": s.get("block_sparsity")}
        print(f"{s['step']}: " + ", ".join(f"{k} {v}" for k, v in shown.items() if v is not None))
    if rep.recovery:
        rv = rep.recovery
        print(f"{rv['step']}: loss {rv['first_loss']:.4f} -> {rv['last_loss']:.4f} in {rv['seconds']:.0f} s"
              + (f", {rv['qat']['integers_moved']:.2%} of the integers moved" if "qat" in rv else ""))
    lp.save(model, out, overwrite=a.overwrite)
    log.info("compressed %d layers in %.1f s (peak RSS %.0f MB) -> %s", len(rep.layers), rep.seconds, rep.peak_rss_mb, out)
    result = {"recipe": r.to_dict(), "output": str(out), "compression": rep.to_dict(), "prediction": pred.to_dict()}
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
        _card_metrics(model, out, rows)
    else:
        print(f"saved {out} ({len(rep.layers)} layers, {rep.seconds:.1f} s, peak RSS {rep.peak_rss_mb:.0f} MB)")
    return result


def _card_metrics(model, out: Path, rows: list[dict]) -> None:
    """Rewrite the output's model card with the measured rows."""
    from llmpress.formats import write_text_atomic
    from llmpress.formats.card import model_card

    write_text_atomic(out / "README.md", model_card(model, "compressed-tensors", metrics=rows))


def _compress_stream(a: argparse.Namespace, r, out: Path, pred) -> dict:
    import llmpress as lp
    from llmpress import assets
    import torch
    from transformers import AutoTokenizer

    from llmpress.stream import compress_streaming, join_group

    src = str(assets.model_path(a.model)) if a.model in assets.MODELS else a.model
    device, group = join_group(a.device)  # one of torchrun's processes: join the group
    rank, world = group.rank, group.world
    tokens = None
    if r.needs_calibration:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=a.trust_remote_code)
        tokens = lp.data.calibration(a.calib, a.n_samples, a.seqlen).tokens(tok)
    rep = compress_streaming(src, r, tokens, out, device=device, batch_size=a.batch_size, overwrite=a.overwrite,
                             resume=not a.no_resume, trust_remote_code=a.trust_remote_code,
                             dtype=None if a.dtype == "auto" else getattr(torch, a.dtype), progress=rank == 0,
                             activations=a.activations)
    if rank != 0:
        return {"rank": rank}
    gpu = "" if rep.peak_gpu_mb is None else f", peak GPU {rep.peak_gpu_mb / 1024:.1f} GB"
    print(f"saved {out} ({len(rep.layers)} layers, streamed, {rep.seconds:.1f} s, peak RSS {rep.peak_rss_mb:.0f} MB{gpu})")
    result = {"recipe": r.to_dict(), "output": str(out), "compression": rep.to_dict(), "prediction": pred.to_dict(),
              "stream": True, "processes": world}
    if a.eval:
        from llmpress.eval.report import QUALITY_COLUMNS, table

        base = lp.load(a.model, trust_remote_code=a.trust_remote_code)
        model = lp.load(out)
        ev = lp.evaluate_many({"base": base, r.name: model}, base, source=a.eval_corpus, n_windows=a.n_windows,
                              seqlen=a.eval_seqlen, paths={r.name: out})
        rows = [_row("base", ev["base"]), _row(r.name, ev[r.name], {"seconds": rep.seconds}, ev["base"].ppl)]
        rows[0]["delta_ppl_pct"] = 0.0
        print(table(rows, QUALITY_COLUMNS))
        result["eval"] = rows
        _card_metrics(model, out, rows)
    return result


def _calib_chars(src: str) -> int | None:
    p = Path(src)
    return p.stat().st_size if p.is_file() else None


def _recover(a: argparse.Namespace) -> dict:
    import llmpress as lp
    from llmpress.data import tokenize
    from llmpress.recover import (
        RecoverConfig, TeacherCache, add_lora, add_qat, cache_teacher, export_qat, merge_lora, recover, save_adapter,
    )
    from llmpress.recover.train import DEFAULT_LR

    out = Path(a.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not a.overwrite:
        raise FileExistsError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    if (a.merge or a.requant) and a.method != "lora":
        raise ValueError("--merge / --requant apply to --method lora (qat and full always save the model)")
    recipe_f = Path(a.model) / "llmpress_recipe.json"
    if a.requant and not (a.merge and recipe_f.is_file()):
        raise ValueError(f"--requant needs --merge and the recipe the model was compressed with ({recipe_f} not found)"
                         if a.merge else "--requant needs --merge")
    lr = a.lr if a.lr is not None else DEFAULT_LR[a.method]
    cfg = RecoverConfig(steps=a.steps, lr=lr, batch_size=a.batch_size, grad_accum=a.grad_accum, kd=a.kd,
                        temperature=a.temperature, ce_weight=a.ce_weight, save_every=a.save_every,
                        warmup=max(a.steps // 10, 1), train=a.method, scale_lr_ratio=a.scale_lr_ratio,
                        hidden_weight=a.hidden_weight)
    if a.teacher_cache and a.hidden_weight:
        raise ValueError("--hidden-weight needs the live teacher; drop --teacher-cache")
    model = lp.load(a.model, trust_remote_code=a.trust_remote_code)
    tok = model.llmpress_tokenizer
    mask = None
    if a.data.endswith(".jsonl"):
        from llmpress.recover.data import pack, read_jsonl

        tokens, mask = pack(read_jsonl(a.data, tok, a.format, a.on_error), a.seqlen)
    else:
        ids = tokenize(tok, lp.data.text(a.data) if Path(a.data).is_file() else lp.data.text(a.data, "calib"))
        n = ids.numel() // a.seqlen
        tokens = ids[: n * a.seqlen].reshape(n, a.seqlen)
    n = tokens.shape[0]
    if n < a.batch_size:
        raise ValueError(f"{a.data}: {n} sequences of {a.seqlen} tokens; need at least --batch-size ({a.batch_size})")
    cdir = Path(a.teacher_cache) if a.teacher_cache and a.kd != "none" else None
    live = (a.kd != "none" and cdir is None) or a.hidden_weight > 0
    build = cdir is not None and not (cdir / "cache.json").exists()
    base = lp.load(a.base, trust_remote_code=a.trust_remote_code) if (live or build or a.eval) else None
    teacher = base if live else None
    if cdir is not None:
        if build:
            cache_teacher(base, tokens, cdir, k=a.topk, temperature=a.temperature, overwrite=True)
        teacher = TeacherCache(cdir)
        if not a.eval:
            base = None  # training needs only the cache
    if a.device != "cpu":
        import torch

        from llmpress.kernels import prepack

        half = torch.bfloat16 if a.device.startswith("cuda") else None
        for m in (model, base):
            if m is not None:
                m.to(a.device, dtype=half)
        if half and a.method == "lora":
            prepack(model, half, offload_codes=True)
    result: dict = {"config": cfg.__dict__, "method": a.method, "device": a.device, "train_sequences": n}
    if a.eval:
        result["before"] = lp.evaluate(model, base, n_windows=a.n_windows).to_dict()
    if a.method == "lora":
        add_lora(model, r=a.rank, alpha=a.alpha or 2.0 * a.rank, targets=a.targets.split(",") if a.targets else None)
    elif a.method == "qat":
        add_qat(model, learn_scales=a.learn_scales or a.scales_only, learn_weights=not a.scales_only)
    rep = recover(model, tokens, teacher, cfg, checkpoint_dir=a.checkpoint, loss_mask=mask)
    result.update(steps=rep.steps, first_loss=rep.losses[0] if rep.losses else None,
                  last_loss=rep.losses[-1] if rep.losses else None, seconds=rep.seconds,
                  tokens_per_s=rep.tokens_per_s, peak_rss_mb=rep.peak_rss_mb, resumed_from=rep.resumed_from)
    if a.method == "qat":
        result["qat"] = export_qat(model)  # the integer model is what gets evaluated and saved
    if a.eval:
        result["after"] = lp.evaluate(model, base, n_windows=a.n_windows).to_dict()
    model.to("cpu")
    if a.method == "lora" and not a.merge:
        save_adapter(model, out, base_model=a.base, overwrite=a.overwrite)
    else:
        if a.merge:
            merge_lora(model)
        if a.requant:
            from llmpress.recipe import Recipe

            lp.compress(model, Recipe.from_dict(json.loads(recipe_f.read_text())), progress=True)
            if a.eval:
                result["after_requant"] = lp.evaluate(model, base, n_windows=a.n_windows).to_dict()
        lp.save(model, out, overwrite=a.overwrite)
    print(f"recovered ({a.method}) {rep.steps} steps in {rep.seconds:.0f} s ({rep.tokens_per_s:.0f} tok/s), loss "
          f"{result['first_loss']:.4f} -> {result['last_loss']:.4f}; wrote {out}")
    if "qat" in result:
        print(f"QAT: {result['qat']['integers_moved']:.2%} of the integers moved, scales changed "
              f"{result['qat']['scale_change']:.2%} on average")
    if a.eval:
        b, f = result["before"], result["after"]
        print(f"ppl {b['ppl']:.3f} -> {f['ppl']:.3f}, KL {b['kl']:.4f} -> {f['kl']:.4f}")
        if "after_requant" in result:
            r = result["after_requant"]
            print(f"merged and re-compressed: ppl {r['ppl']:.3f}, KL {r['kl']:.4f}")
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

    kind, _, arg = a.format.partition(":")
    if kind not in ("gguf", "onnx", "compressed-tensors") or (kind == "onnx" and arg not in ("", "float32", "int4")):
        raise ValueError(f"unknown export format {a.format!r}; allowed: gguf:<type>, onnx[:float32|int4], "
                         "compressed-tensors")  # before loading the model
    out = Path(a.output)
    if out.exists() and not a.overwrite and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"output {out} exists; pass --overwrite to replace it")
    if a.imatrix and kind != "gguf":
        raise ValueError("--imatrix applies to GGUF exports")
    model = lp.load(a.model, trust_remote_code=a.trust_remote_code)
    calib = lp.data.calibration(a.calib, a.n_samples, a.seqlen) if a.imatrix else None
    s = lp.export(model, out, a.format, overwrite=a.overwrite, calib=calib)
    fb = s.get("fallback") or {}
    print(f"wrote {s['file']} ({s['type']}" + (f", {s['size_mb']:.1f} MB" if "size_mb" in s else "") + ")"
          + (f"; {len(fb)} tensors fell back: " + ", ".join(f"{k} {v}" for k, v in fb.items()) if fb else ""))
    return s


def _plan(a: argparse.Namespace) -> dict:
    import llmpress as lp
    from llmpress.plan import Sensitivity, allocate, measure
    from llmpress.recipe import QuantStep, RecipeError

    out = Path(a.output)
    if out.exists() and not a.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    target_size = parse_size(a.target_size) if a.target_size else None
    bits = [int(b) for b in a.bits.split(",")]
    groups = [int(g) for g in a.group_sizes.split(",")]
    asym = [int(b) for b in a.asym_bits.split(",") if b.strip()]
    steps = [s for s in lp.recipe(a.preset).steps if isinstance(s, QuantStep)]
    if len(steps) != 1:
        raise RecipeError(f"--preset {a.preset!r} must have exactly one quantization step to plan")
    sf = Path(a.sensitivity) if a.sensitivity else None
    if sf is not None and sf.exists():
        sens = Sensitivity.load(sf)
        log.info("reusing the sensitivity in %s (%d units, measured on %d tokens)", sf, len(sens.units), sens.tokens)
    else:
        model = lp.load(a.model, trust_remote_code=a.trust_remote_code)
        tokens = lp.data.calibration(a.calib, a.n_samples + a.fit_samples, a.seqlen).tokens(model.llmpress_tokenizer)
        sens = measure(model, tokens[: a.n_samples], steps[0], bits, groups, batch_size=a.batch_size, name=a.model,
                       fit_tokens=tokens[a.n_samples :] if a.fit_samples else None,
                       direct_tokens=tokens[: min(a.direct_samples, a.n_samples)] if a.direct_samples > 0 else None,
                       asym_bits=asym)
        if sf is not None:
            sens.save(sf)
    p = allocate(sens, target_bits=a.target_bits, target_size_mb=target_size, max_kl=a.max_kl)
    from llmpress.formats import write_text_atomic

    write_text_atomic(out, p.to_yaml())
    s = p.summary()
    counts: dict = {}
    for row in p.layers():
        key = (row["bits"], row["group_size"], "" if row["symmetric"] == sens.symmetric else " asym" if not row["symmetric"] else " sym")
        counts[key] = counts.get(key, 0) + 1
    print(f"plan for {a.model}: target {s['target']}")
    print(f"  {s['avg_bits']:.3f} bits/weight over {s['layers']} layers, checkpoint ~{s['size_mb']:.2f} MB, "
          f"predicted KL {s['predicted_kl']:.4f} nats/token")
    print("  layers per setting: " + ", ".join(f"w{b} g{g}{a_}: {n}" for (b, g, a_), n in sorted(counts.items())))
    print(f"  recipe written to {out}; run: llmpress compress {a.model} --recipe {out} -o OUT")
    return {"summary": s, "layers": p.layers(), "recipe": str(out)}


def _compare(a: argparse.Namespace) -> dict:
    from llmpress.eval.report import table
    from llmpress.plan.compare import COLUMNS, compare

    recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    if not recipes:
        raise ValueError("--recipes names no recipe")
    rep = compare(a.model, recipes, a.output, group_size=a.group_size, n_windows=a.n_windows, seqlen=a.seqlen,
                  corpus=a.corpus, calib=a.calib, n_samples=a.n_samples, keep_models=a.keep_models,
                  overwrite=a.overwrite, device=a.device)
    print(f"\n{a.model}: {rep['protocol']}\n")
    print(table(rep["rows"], COLUMNS))
    for k, v in rep["failed"].items():
        print(f"failed: {k}: {v}")
    print(f"\nreport: {a.output}/report.md, report.html, report.json, " + ", ".join(rep["charts"].values()))
    return rep


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
    if a.cmd == "compress" and a.gpus > 1 and "WORLD_SIZE" not in os.environ:
        if not a.stream:
            print("llmpress compress: error: --gpus needs --stream", file=sys.stderr)
            return 2
        return _launch(a.gpus, list(sys.argv[1:] if argv is None else argv))
    try:
        result = {"compress": _compress, "eval": _eval, "export": _export, "info": _info,
                  "generate": _generate, "bench-speed": _bench_speed, "recover": _recover,
                  "plan": _plan, "compare": _compare}[a.cmd](a)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError, MemoryError) as ex:
        print(f"llmpress {a.cmd}: error: {ex}", file=sys.stderr)
        return 2
    if result.get("rank", 0) != 0:  # another process of a torchrun group: rank 0 reports
        return 0
    if getattr(a, "json", None):
        result["wall_seconds"] = time.perf_counter() - t0
        from llmpress.calibrate import peak_rss_mb

        result["peak_rss_mb"] = peak_rss_mb()  # the whole command's, saving included
        Path(a.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


def _launch(n: int, argv: list[str]) -> int:
    """``llmpress compress ... --gpus N``: the same command under torchrun, one process per GPU."""
    import subprocess

    rest, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--gpus":
            skip = True
        elif not x.startswith("--gpus="):
            rest.append(x)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "llmpress", *rest]
    log.info("launching %s", " ".join(cmd))
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
