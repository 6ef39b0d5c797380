"""Compress a model bigger than it needs to be held: a Llama-3-8B-shaped checkpoint with random
bf16 weights (sharded safetensors, built here), GPTQ W4 g128 on 128 x 2048 calibration tokens,
streamed block by block (``llmpress compress --stream``). Reports wall time, peak GPU memory and
peak host RSS per run; checks that peak GPU memory follows the block, not the number of blocks
(16- and 32-block variants), that a run killed with SIGKILL and resumed writes the same bytes,
and runs llm-compressor's GPTQ on the same checkpoint and tokens when it is importable (a 4-block
variant by default: its per-block time is the comparison), with the output error of both on
held-aside tokens.

    python bench/scale.py --out DIR                  # on the GPU machine (bench/gpu_session.sh scale)
    python bench/scale.py --shape tiny --device cpu  # a small smoke run of every phase on the CPU

Every measured run is its own process (clean peak RSS and GPU statistics).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # Llama-3-8B; a tiny one for smoke runs on the CPU
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1024, rope_theta=10000.0, max_position_embeddings=1024),
}


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# --- the checkpoint ------------------------------------------------------------------------

def build(work: Path, shape: str, n_blocks: int, device: str) -> Path:
    """One shard per block plus one for embeddings / norm / head, random N(0, 0.02) bf16
    weights, generated on ``device``; variants with fewer blocks link the same shard files."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    full = work / f"{shape}-{n_blocks}"
    if (full / "config.json").exists():
        return full
    full.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=n_blocks, tie_word_embeddings=False,
                      rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
    cfg.dtype = "bfloat16"
    h, i, nh, nkv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = h // nh
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    t0 = time.perf_counter()
    weight_map = {}
    for b in range(n_blocks):
        p = f"model.layers.{b}."
        t = {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(nkv * hd, h),
             p + "self_attn.v_proj.weight": rnd(nkv * hd, h), p + "self_attn.o_proj.weight": rnd(h, h),
             p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
             p + "mlp.down_proj.weight": rnd(h, i),
             p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        name = f"block-{b:05d}.safetensors"
        save_file(t, str(full / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
    t = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
         "lm_head.weight": rnd(cfg.vocab_size, h)}
    save_file(t, str(full / "rest.safetensors"), metadata={"format": "pt"})
    weight_map.update({k: "rest.safetensors" for k in t})
    (full / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(full)
    print(f"built {full} ({n_blocks} blocks) in {time.perf_counter() - t0:.1f} s", flush=True)
    return full


def variant(full: Path, n: int) -> Path:
    """The first ``n`` blocks of ``full`` (shard files linked, not copied)."""
    d = full.parent / f"{full.name.rsplit('-', 1)[0]}-{n}"
    if (d / "config.json").exists():
        return d
    d.mkdir(exist_ok=True)
    idx = json.loads((full / "model.safetensors.index.json").read_text())
    keep = {k: v for k, v in idx["weight_map"].items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}
    for f in set(keep.values()):
        if not (d / f).exists():
            os.link(full / f, d / f)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    cfg = json.loads((full / "config.json").read_text())
    cfg["num_hidden_layers"] = n
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


def tokens(work: Path, shape: str, n: int, seqlen: int, seed: int, name: str) -> Path:
    from safetensors.torch import save_file

    p = work / f"{name}-{n}x{seqlen}-{seed}.safetensors"
    if not p.exists():
        ids = torch.randint(2, SHAPES[shape]["vocab_size"], (n, seqlen), generator=torch.Generator().manual_seed(seed))
        save_file({"input_ids": ids}, str(p))
    return p


def _read_tokens(p: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(p)["input_ids"]


def _tokenizer(vocab: int):
    """Any tokenizer object (llm-compressor wants a processor; the ids are given)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1")


# --- the runs (each in its own process) ----------------------------------------------------

def child_ours(a) -> dict:
    sys.path.insert(0, str(ROOT))
    import llmpress as lp
    import torch.distributed as dist

    from llmpress.stream import compress_streaming, join_group

    device, group = join_group(a.device)  # under torchrun: one process per GPU, NCCL (gloo on the CPU)
    world, rank = group.world, group.rank
    t0 = time.perf_counter()
    r = lp.recipe(a.recipe, group_size=128)
    rep = compress_streaming(a.model, r, _read_tokens(a.tokens), a.output, device=device, batch_size=a.batch_size,
                             progress=rank == 0, overwrite=True, activations=a.activations)
    sec = time.perf_counter() - t0
    gpu = 0.0 if rep.peak_gpu_mb is None else rep.peak_gpu_mb / 1024
    rss = _peak_rss_gb()
    rss_sum = rss
    if world > 1:  # the largest GPU peak of any rank, host memory summed over the processes
        stats = torch.tensor([gpu, rss, sec], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        tot = torch.tensor([rss], dtype=torch.float64, device=device)
        dist.all_reduce(tot)
        gpu, rss, sec = stats.tolist()
        rss_sum = float(tot.item())
        dist.destroy_process_group()
        if rank != 0:
            return None
    return {"tool": "llmpress", "seconds": sec, "compress_seconds": rep.seconds,
            "peak_gpu_gb": gpu if rep.peak_gpu_mb is not None else None, "gpus": world,
            "peak_rss_gb": rss, "peak_rss_gb_all_processes": rss_sum, "layers": len(rep.layers), "recipe": r.to_dict(),
            "phases": rep.phases}


def child_peer(a) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    ids = _read_tokens(a.tokens)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if a.device == "cuda" else torch.float32)
    oneshot(model=model, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], processor=_tokenizer(cfg["vocab_size"]),
            output_dir=a.output, pipeline="sequential")
    sec = time.perf_counter() - t0
    return {"tool": "llm-compressor", "seconds": sec,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else None,
            "peak_rss_gb": _peak_rss_gb(), "version": __import__("llmcompressor").__version__}


def child_error(a) -> dict:
    """Relative error of the last hidden state (after the final norm) against the original
    model on held-aside tokens, for each compressed checkpoint."""
    sys.path.insert(0, str(ROOT))
    import llmpress as lp

    dt = torch.bfloat16 if a.device == "cuda" else torch.float32
    ids = _read_tokens(a.tokens).to(a.device)

    def hidden(path: str) -> torch.Tensor:
        m = lp.load(path, dtype=dt).to(a.device)
        out = []
        with torch.inference_mode():
            for b in range(0, ids.shape[0], 2):
                out.append(m.model(input_ids=ids[b:b + 2]).last_hidden_state.float().cpu())
        del m
        if a.device == "cuda":
            torch.cuda.empty_cache()
        return torch.cat(out)

    ref = hidden(a.model)
    res = {}
    for kv in a.compare.split(","):
        name, path = kv.split("=", 1)
        h = hidden(path)
        res[name] = float(((h - ref) ** 2).sum() / (ref ** 2).sum())
    return {"rel_mse": res, "held_tokens": int(ids.numel())}


def run_child(kind: str, args: list[str], env: dict | None = None, kill_when=None, timeout: float = 3000,
              python: str | None = None, gpus: int = 1) -> dict:
    j = Path(f"/tmp/scale-child-{kind}-{os.getpid()}.json")
    j.unlink(missing_ok=True)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"] if gpus > 1 else []
    cmd = [python or sys.executable, *launcher, __file__, "--child", kind, "--json", str(j), *args]
    print("$", " ".join(cmd), flush=True)
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    t0 = time.perf_counter()
    while p.poll() is None:
        if kill_when is not None and kill_when():
            p.send_signal(signal.SIGKILL)
            p.wait()
            return {"killed_after_s": time.perf_counter() - t0}
        if time.perf_counter() - t0 > timeout:
            p.kill()
            raise TimeoutError(kind)
        time.sleep(0.2)
    if p.returncode != 0 or not j.exists():
        raise RuntimeError(f"{kind} child failed with rc {p.returncode}")
    return json.loads(j.read_text())


def _hashes(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir()) if f.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--json")
    ap.add_argument("--model")
    ap.add_argument("--output")
    ap.add_argument("--tokens")
    ap.add_argument("--compare")
    ap.add_argument("--recipe", default="w4a16-gptq")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", default="/tmp/scale")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--blocks", default="32,16", help="variants compressed whole (the first is built)")
    ap.add_argument("--peer-blocks", type=int, default=4, help="variant both tools compress (0: no peer run)")
    ap.add_argument("--resume-blocks", type=int, default=16, help="variant killed and resumed (0: skip)")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--phases", default="build,ours,resume,peer,error")
    ap.add_argument("--activations", default="auto", choices=("auto", "gpu", "host"))
    ap.add_argument("--gpus", default="1", help="GPU counts for the 'ours' phase, e.g. 1,2 (torchrun, NCCL)")
    ap.add_argument("--peer-python", default=sys.executable, help="interpreter with llmcompressor (its own venv)")
    a = ap.parse_args()

    if a.child:
        res = {"ours": child_ours, "peer": child_peer, "error": child_error}[a.child](a)
        if res is not None:
            Path(a.json).write_text(json.dumps(res))
        return

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = a.phases.split(",")
    gpu_counts = [int(x) for x in a.gpus.split(",")]
    blocks = [int(x) for x in a.blocks.split(",")]
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    res_path = out / ("scale.json" if a.shape == "llama3-8b" else f"scale-{a.shape}.json")
    results = json.loads(res_path.read_text()) if res_path.exists() else {"rows": []}
    results.update(device=device_name, shape=a.shape, n_samples=a.n_samples, seqlen=a.seqlen, batch_size=a.batch_size,
                   command="python bench/scale.py " + " ".join(sys.argv[1:]))
    rows = results["rows"]

    def save_rows():
        res_path.write_text(json.dumps(results, indent=2))

    def add(row: dict) -> None:
        key = (row["tool"], row["blocks"], row.get("run"), row.get("gpus"))
        rows[:] = [r for r in rows if (r["tool"], r["blocks"], r.get("run"), r.get("gpus")) != key]
        rows.append(row)
        save_rows()
        print(json.dumps(row), flush=True)

    if "check" in phases:  # the GPTQ kernel against the reference loop, on this device
        sys.path.insert(0, str(ROOT))
        from llmpress.quant.gptq import GPTQConfig, gptq
        from llmpress.quant.primitives import QuantScheme

        g = torch.Generator(device=a.device).manual_seed(0)
        w = torch.randn(3072, 4096, generator=g, device=a.device)
        x = torch.randn(8192, 4096, generator=g, device=a.device) * torch.rand(4096, generator=g, device=a.device) * 3
        h = 2 * x.T @ x / x.shape[0]
        chk = {}
        for kern in (False, True):
            gptq(w[:256], h, QuantScheme(4, True, "group", 128), kernel=kern)  # warm-up / compile
            if a.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            q = gptq(w, h, QuantScheme(4, True, "group", 128), GPTQConfig(), kernel=kern)
            if a.device == "cuda":
                torch.cuda.synchronize()
            chk["kernel" if kern else "reference"] = (q, time.perf_counter() - t0)
        from llmpress import stats

        xb = (torch.randn(16384, 4096, generator=g, device=a.device) * 2).bfloat16()
        exact = (xb.double().T @ xb.double()) * 2 / xb.shape[0]
        hs = {}
        for fast in (False, True):
            stats._MM_OUT_DTYPE[0] = fast
            st = stats.STATS["hessian"](4096, torch.device(a.device))
            st.update(xb)
            if a.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(4):
                st.update(xb)
            if a.device == "cuda":
                torch.cuda.synchronize()
            hs["bf16-mm" if fast else "tf32"] = {"seconds_4_updates": time.perf_counter() - t0,
                                                 "rel_err": float((st.result().double() - exact).norm() / exact.norm())}
        stats._MM_OUT_DTYPE[0] = True
        results["hessian_check"] = hs
        print(json.dumps(hs), flush=True)
        (qr, tr), (qk, tk) = chk["reference"], chk["kernel"]
        results["gptq_kernel_check"] = {"shape": [3072, 4096], "same_codes": float((qr.qdata == qk.qdata).float().mean()),
                                        "loss_reference": qr.info["gptq_loss"], "loss_kernel": qk.info["gptq_loss"],
                                        "seconds_reference": tr, "seconds_kernel": tk, "speedup": tr / tk}
        save_rows()
        print(json.dumps(results["gptq_kernel_check"]), flush=True)

    full = build(work, a.shape, max(blocks + [a.peer_blocks, a.resume_blocks]), a.device)
    calib = tokens(work, a.shape, a.n_samples, a.seqlen, 0, "calib")
    held = tokens(work, a.shape, 8, a.seqlen, 1, "held")
    shape_name = f"{a.shape} ({SHAPES[a.shape]['hidden_size']}/{SHAPES[a.shape]['intermediate_size']}, bf16)"
    common = ["--tokens", str(calib), "--device", a.device, "--batch-size", str(a.batch_size), "--recipe", a.recipe,
              "--activations", a.activations]

    if "ours" in phases:
        for n in blocks:
            d = variant(full, n)
            for g in gpu_counts:
                r = run_child("ours", ["--model", str(d), "--output", str(work / f"ours-{n}-g{g}"), *common], gpus=g)
                add({"tool": "llmpress", "model_shape": shape_name, "blocks": n, "gpus": g,
                     "method": "gptq w4 g128 (stream)", "seconds": r["seconds"], "seconds_per_block": r["seconds"] / n,
                     "peak_gpu_gb": r["peak_gpu_gb"], "peak_rss_gb": r["peak_rss_gb"],
                     "peak_rss_gb_all_processes": r["peak_rss_gb_all_processes"], "activations": a.activations,
                     "run": f"full-{g}gpu" + ("" if a.activations == "auto" else f"-{a.activations}"),
                     "phases": r["phases"]})
            if len(gpu_counts) > 1:  # several GPUs against one, same run: speed-up and agreement
                base, multi = work / f"ours-{n}-g{gpu_counts[0]}", work / f"ours-{n}-g{gpu_counts[-1]}"
                rows_n = {x["gpus"]: x for x in rows if x["blocks"] == n and x.get("gpus")}
                results.setdefault("multi_gpu", {})[str(n)] = {
                    "speedup": rows_n[gpu_counts[0]]["seconds"] / rows_n[gpu_counts[-1]]["seconds"],
                    "agreement": run_child("error", ["--model", str(d), "--tokens", str(held), "--device", a.device,
                                                     "--compare", f"one={base},several={multi}"])}
                save_rows()
                print(json.dumps(results["multi_gpu"][str(n)]), flush=True)
    if "resume" in phases and a.resume_blocks:
        n = a.resume_blocks
        d = variant(full, n)
        ref = work / f"ours-{n}"
        if not ref.exists():
            run_child("ours", ["--model", str(d), "--output", str(ref), *common])
        o = work / f"ours-{n}-resumed"
        prog = work / f".{o.name}.llmpress-partial" / "progress.json"

        def halfway() -> bool:
            try:
                return json.loads(prog.read_text())["done"] >= n // 2
            except (OSError, ValueError, KeyError):
                return False

        k = run_child("ours", ["--model", str(d), "--output", str(o), *common], kill_when=halfway)
        done = json.loads(prog.read_text())["done"] if prog.exists() else None
        r = run_child("ours", ["--model", str(d), "--output", str(o), *common])
        same = _hashes(ref) == _hashes(o)
        add({"tool": "llmpress", "model_shape": shape_name, "blocks": n, "method": "gptq w4 g128 (stream), resumed",
             "seconds": r["seconds"], "peak_gpu_gb": r["peak_gpu_gb"], "peak_rss_gb": r["peak_rss_gb"], "run": "resume",
             "killed_after_blocks": done, "killed_after_s": k.get("killed_after_s"), "identical_files": same})
    if "peer" in phases and a.peer_blocks:
        n = a.peer_blocks
        d = variant(full, n)
        r = run_child("ours", ["--model", str(d), "--output", str(work / f"ours-{n}"), *common])
        add({"tool": "llmpress", "model_shape": shape_name, "blocks": n, "method": "gptq w4 g128 (stream)",
             "seconds": r["seconds"], "seconds_per_block": r["seconds"] / n, "peak_gpu_gb": r["peak_gpu_gb"],
             "peak_rss_gb": r["peak_rss_gb"], "run": "full"})
        try:
            r = run_child("peer", ["--model", str(d), "--output", str(work / f"peer-{n}"), *common],
                          python=a.peer_python)
            add({"tool": "llm-compressor", "model_shape": shape_name, "blocks": n,
                 "method": f"GPTQModifier W4A16 (llmcompressor {r['version']})", "seconds": r["seconds"],
                 "seconds_per_block": r["seconds"] / n, "peak_gpu_gb": r["peak_gpu_gb"],
                 "peak_rss_gb": r["peak_rss_gb"], "run": "full"})
        except Exception as e:  # noqa: BLE001 - the peer is optional
            results["peer_error"] = f"{type(e).__name__}: {e}"
            save_rows()
            print("peer failed:", e, flush=True)
    if "error" in phases and a.peer_blocks:
        n = a.peer_blocks
        d = variant(full, n)
        cmp = [f"llmpress={work / f'ours-{n}'}"] + ([f"llm-compressor={work / f'peer-{n}'}"]
                                                    if (work / f"peer-{n}" / "config.json").exists() else [])
        r = run_child("error", ["--model", str(d), "--tokens", str(held), "--device", a.device, "--compare", ",".join(cmp)])
        results["output_error"] = {"blocks": n, **r}
        save_rows()
        print(json.dumps(results["output_error"]), flush=True)
    print(f"wrote {res_path}")


if __name__ == "__main__":
    main()
