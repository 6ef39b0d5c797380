"""Decode speed at batch 1: the llmpress runtime (static cache + CUDA graph, Triton W4A16) against
transformers' eager generate in bf16 and with torchao int4, on a Llama-3-8B-shaped model with
random weights (no download needed; speed does not depend on the values). Also speculative
decoding on real text with smollm2-135m.

  python bench/decode.py --out DIR            # GPU table (Llama-3-8B shape)
  python bench/decode.py --spec --out DIR     # speculative decoding, smollm2-135m (CPU or GPU)

The bandwidth limit is (copy ceiling measured in the same run) / (bytes of weights read per
token). Every linear, the LM head included, is quantized in the 4-bit rows (torchao's default
does the same), so the rows compare like with like.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmpress.runtime import Runtime, SpeculativeRuntime, _sync  # noqa: E402


def llama8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                       tie_word_embeddings=False)


def random_model(cfg, dev):
    from transformers import AutoModelForCausalLM

    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02, generator=g)
    return model.eval()


def to_w4(model, group: int = 128):
    """Every nn.Linear (the head too) → QuantLinear int4 g``group`` symmetric, RTN, on the GPU."""
    from llmpress.models import set_submodule
    from llmpress.nn import QuantLinear
    from llmpress.quant.primitives import QuantScheme
    from llmpress.quant.rtn import rtn

    sch = QuantScheme(4, True, "group", group)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for n in names:
        lin = model.get_submodule(n)
        w = lin.weight.detach().float()
        qw = rtn(w, sch)
        qw.scale = qw.scale.to(torch.bfloat16)
        set_submodule(model, n, QuantLinear(qw, lin.bias))
        del lin
    return model


def weight_bytes(model) -> int:
    from llmpress.nn import QuantLinear

    tot = 0
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            tot += m.qweight.storage_bits() // 8
        elif isinstance(m, torch.nn.Linear):
            tot += m.weight.numel() * m.weight.element_size()
    return tot  # embeddings: one row per token, negligible


def eager_tps(model, ids, new: int, reps: int = 2) -> float:
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return new / statistics.median(ts)  # whole call, prefill included (small next to decode here)


def runtime_row(model, ids, new: int, reps: int = 3, compile: bool = False, fuse: bool = True) -> dict:
    import torch._dynamo

    from llmpress.fuse import unfuse_projections

    if not fuse:
        unfuse_projections(model)
    torch._dynamo.reset()  # each compiled row traces its own model state (fused or not, PDL or not)
    rt = Runtime(model, max_len=ids.shape[1] + new + 8, compile=compile, fuse=fuse)
    rt.generate(ids, 8)
    runs = [rt.generate(ids, new)[1] for _ in range(reps)]
    ref = runs[0]
    out = {"tokens_per_s": statistics.median(r.decode_tps for r in runs),
           "prefill_tokens_per_s": statistics.median(r.prefill_tps for r in runs),
           "ttft_ms": statistics.median(r.ttft_s for r in runs) * 1e3, "peak_mem_mb": ref.peak_mem_mb,
           "cuda_graph": ref.cuda_graph, "fused_projections": fuse}
    del rt
    gc.collect()
    return out


def gpu(args) -> dict:
    from bench.kernels import copy_ceiling
    from llmpress.fuse import unfuse_projections
    from llmpress.kernels import triton_wa16 as tw

    dev = torch.device("cuda")
    ceil = copy_ceiling(dev)
    print(f"copy ceiling {ceil / 1e12:.2f} TB/s", flush=True)
    cfg = llama8b_config(args.layers)
    model = random_model(cfg, dev)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(dev)
    rows = []
    wb = weight_bytes(model)
    pdl = tw.GEMV_PDL

    def add(name, fn, nbytes):
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001 — a failed row is reported, the others still run
            print(f"  {name}: FAILED {e!r}"[:400], flush=True)
            rows.append({"runtime": name, "error": repr(e)[:400]})
            return
        limit = ceil / nbytes
        r = {"runtime": name, "shape": f"llama3-8b-shape x{args.layers} layers", "M": 1, **r,
             "weight_gb": nbytes / 1e9, "bandwidth_limit_tokens_per_s": limit, "pct_of_limit": 100 * r["tokens_per_s"] / limit}
        rows.append(r)
        print(f"  {name}: {r['tokens_per_s']:.1f} tok/s ({r['pct_of_limit']:.0f}% of limit)", flush=True)

    with torch.inference_mode():
        add("transformers eager bf16", lambda: {"tokens_per_s": eager_tps(model, ids, args.eager_tokens)}, wb)
        if args.ablate and args.compile:
            add("llmpress runtime bf16 compiled, unfused", lambda: runtime_row(model, ids, args.new, compile=True, fuse=False), wb)
        add("llmpress runtime bf16", lambda: runtime_row(model, ids, args.new), wb)
        if args.compile:
            add("llmpress runtime bf16 compiled", lambda: runtime_row(model, ids, args.new, compile=True), wb)
        # 4-bit: our layers built from the same weights
        q = to_w4(random_model(cfg, dev))
        # same random weights as `model` (same generator seed), quantized
        qb = weight_bytes(q)
        if args.ablate and args.compile:
            add("llmpress runtime w4a16 g128 compiled, unfused", lambda: runtime_row(q, ids, args.new, compile=True, fuse=False), qb)
            if tw._PDL_SUPPORTED and not pdl:
                tw.GEMV_PDL = True
                add("llmpress runtime w4a16 g128 compiled, PDL", lambda: runtime_row(q, ids, args.new, compile=True), qb)
                tw.GEMV_PDL = False
            ov = tw.KN_OVERFLOW
            tw.KN_OVERFLOW = "check" if ov == "xscale" else "xscale"
            add(f"llmpress runtime w4a16 g128 compiled, {tw.KN_OVERFLOW} guard",
                lambda: runtime_row(q, ids, args.new, compile=True), qb)
            tw.KN_OVERFLOW = ov
        add("llmpress runtime w4a16 g128", lambda: runtime_row(q, ids, args.new), qb)
        if args.compile:
            add("llmpress runtime w4a16 g128 compiled", lambda: runtime_row(q, ids, args.new, compile=True), qb)
        del q
        gc.collect()
        torch.cuda.empty_cache()
        unfuse_projections(model)
        try:
            from torchao.quantization import Int4WeightOnlyConfig, quantize_

            quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
            nb = sum(m.weight.numel() // 2 + m.weight.numel() // 128 * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
            add("transformers eager + torchao int4", lambda: {"tokens_per_s": eager_tps(model, ids, args.eager_tokens)}, nb)
        except Exception as e:  # noqa: BLE001
            print("torchao row failed:", repr(e)[:400])
    by = {r["runtime"]: r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    summary = {"pdl": pdl, "kn_overflow": tw.KN_OVERFLOW}
    if "llmpress runtime bf16" in by and "llmpress runtime w4a16 g128" in by:
        summary.update(bf16_pct_of_limit=next(r["pct_of_limit"] for r in rows if r["runtime"] == "llmpress runtime bf16"),
                       w4_vs_our_bf16=by["llmpress runtime w4a16 g128"] / by["llmpress runtime bf16"],
                       w4_vs_eager_bf16=by["llmpress runtime w4a16 g128"] / by["transformers eager bf16"])
        if "transformers eager + torchao int4" in by:
            summary["w4_vs_torchao_eager"] = by["llmpress runtime w4a16 g128"] / by["transformers eager + torchao int4"]
    if "llmpress runtime bf16 compiled" in by and "llmpress runtime w4a16 g128 compiled" in by:
        lim = next(r["bandwidth_limit_tokens_per_s"] for r in rows if r["runtime"] == "llmpress runtime bf16 compiled")
        summary["compiled_bf16_pct_of_limit"] = 100 * by["llmpress runtime bf16 compiled"] / lim
        summary["compiled_w4_vs_compiled_bf16"] = by["llmpress runtime w4a16 g128 compiled"] / by["llmpress runtime bf16 compiled"]
        if "transformers eager + torchao int4" in by:
            summary["compiled_w4_vs_torchao_eager"] = (by["llmpress runtime w4a16 g128 compiled"]
                                                       / by["transformers eager + torchao int4"])
    return {"device": torch.cuda.get_device_name(), "copy_ceiling_tb_s": ceil / 1e12, "rows": rows, "summary": summary}


def spec(args) -> dict:
    """Speculative decoding on real text: smollm2-135m target, a compressed copy as the draft."""
    import llmpress as lp
    from llmpress import data

    dev = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    tdt = torch.bfloat16 if dev == "cuda" else torch.float32
    target = lp.load("smollm2-135m", dtype=tdt, device=dev)
    tok = target.llmpress_tokenizer
    draft = lp.load("smollm2-135m", dtype=torch.bfloat16, device=dev)
    if args.draft_recipe:
        lp.compress(draft, lp.recipe(args.draft_recipe, group_size=args.draft_group), progress=False)
    prompts = []
    for para in data.text("wiki", "eval").split("\n"):
        ids = tok(para, return_tensors="pt").input_ids
        if ids.shape[1] >= args.prompt:
            prompts.append(ids[:, : args.prompt])
        if len(prompts) == args.n_prompts:
            break
    rt = Runtime(target, max_len=args.prompt + args.new + 8)
    sp = SpeculativeRuntime(target, draft, k=args.k, max_len=args.prompt + args.new + 8)
    rt.generate(prompts[0], 4)
    sp.generate(prompts[0], 4)
    same, t_base, t_spec, acc = 0, 0.0, 0.0, []
    for p in prompts:
        a, s1 = rt.generate(p, args.new)
        b, s2 = sp.generate(p, args.new)
        same += int(torch.equal(a.cpu(), b.cpu()))
        t_base += s1.decode_s / max(s1.new_tokens, 1)
        t_spec += s2.decode_s / max(s2.new_tokens, 1)
        acc.append(s2.accepted_per_step)
    res = {"device": dev, "target": f"smollm2-135m {tdt}", "draft": f"smollm2-135m bf16 {args.draft_recipe} g{args.draft_group}", "k": args.k,
           "prompts": len(prompts), "identical_outputs": same, "tokens_per_target_step": statistics.mean(acc),
           "speedup": t_base / t_spec}
    print(json.dumps(res, indent=1))
    return res


def spec_cost(args) -> dict:
    """What a speculative round costs on this machine, as ratios to one target step: the
    target's forward over 1, 2 and k + 1 tokens, the compressed draft's forward over 1 token
    (and its share spent outside the matmuls), and the draft's decode step eager and through
    torch.compile. A round of k proposals pays k draft steps plus one (k + 1)-token target
    forward for its accepted tokens + 1."""
    import llmpress as lp

    dev = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    tdt = torch.bfloat16 if dev == "cuda" else torch.float32
    target = lp.load("smollm2-135m", dtype=tdt, device=dev)
    draft = lp.load("smollm2-135m", dtype=torch.bfloat16, device=dev)
    lp.compress(draft, lp.recipe(args.draft_recipe, group_size=args.draft_group), progress=False)
    ids = torch.randint(100, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(dev)

    def forward_ms(model, t: int, reps: int = 15) -> float:
        rt = Runtime(model, max_len=args.prompt + 16, cuda_graph=False)
        with torch.inference_mode():
            rt._set_length(0)
            rt._forward(ids, torch.arange(args.prompt, device=dev).reshape(1, -1))
            ts = []
            for _ in range(reps):
                rt._set_length(args.prompt)
                _sync(torch.device(dev))
                t0 = time.perf_counter()
                rt._forward(ids[:, :t], torch.arange(args.prompt, args.prompt + t, device=dev).reshape(1, -1), keep=0)
                _sync(torch.device(dev))
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    def step_ms(model, compile: bool) -> float:
        rt = Runtime(model, max_len=args.prompt + args.new + 8, compile=compile, fuse=False)
        rt.generate(ids, 8)
        return 1e3 / statistics.median(rt.generate(ids, args.new)[1].decode_tps for _ in range(3))

    t1 = forward_ms(target, 1)
    res = {"device": dev, "target": f"smollm2-135m {tdt}", "draft": f"smollm2-135m bf16 {args.draft_recipe} g{args.draft_group}",
           "k": args.k, "ratios_to_target_1_token_forward": {
               "target forward, 2 tokens": forward_ms(target, 2) / t1,
               f"target forward, {args.k + 1} tokens": forward_ms(target, args.k + 1) / t1,
               "draft forward, 1 token": forward_ms(draft, 1) / t1,
               "draft decode step, eager": step_ms(draft, False) / t1,
               "draft decode step, torch.compile": step_ms(draft, True) / t1}}
    from torch.profiler import ProfilerActivity, profile

    rt = Runtime(draft, max_len=args.prompt + 32, cuda_graph=False)
    rt.generate(ids, 4)
    with torch.inference_mode():
        step = rt._decode_fn(None, None, True)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    mm = sum(e.self_cpu_time_total for e in ev if "int4pack_mm" in e.key or e.key in ("aten::mm", "aten::addmm"))
    res["draft_step_share_in_matmuls"] = mm / total
    print(json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--eager-tokens", type=int, default=64)
    ap.add_argument("--spec", action="store_true")
    ap.add_argument("--spec-cost", action="store_true", help="a speculative round's parts as ratios to one target step")
    ap.add_argument("--compile", action="store_true", help="also the runtime with the decode step through torch.compile")
    ap.add_argument("--ablate", action="store_true",
                    help="with --compile: also compiled rows without fused projections, W4 with PDL and with the other overflow guard")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--draft-recipe", default="w4a16-rtn")
    ap.add_argument("--draft-group", type=int, default=64)
    args = ap.parse_args()
    if args.spec_cost:
        res = spec_cost(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"spec-cost-{res['device']}.json").write_text(json.dumps(res, indent=1))
        return
    res = spec(args) if args.spec else gpu(args)
    name = "spec-decode.json" if args.spec else "gpu-decode.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / name).write_text(json.dumps(res, indent=1))
    if not args.spec:
        print(f"{'runtime':36s} {'tok/s':>8s} {'limit':>8s} {'%limit':>7s}")
        for r in res["rows"]:
            if "error" in r:
                print(f"{r['runtime']:36s} FAILED")
                continue
            print(f"{r['runtime']:36s} {r['tokens_per_s']:8.1f} {r['bandwidth_limit_tokens_per_s']:8.1f} {r['pct_of_limit']:7.1f}")
        print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
