"""QLoRA vs LoRA on the GPU: peak GPU memory and training throughput, each variant in its own
process, against plain transformers + peft in the same run.

  python bench/recover_gpu.py --out /tmp/out                 # Llama-3.2-1B shape, random bf16 weights

Variants (same batches, r = 16 on the 7 block linears, AdamW, gradient checkpointing, causal-LM
loss, 2 warm-up steps, then ``--steps`` timed):
  peft-lora-bf16        transformers + peft on the bf16 base, the loss on whole logits (reference)
  lora-bf16             llmpress LoRA on the bf16 base (logits 128 tokens at a time)
  qlora-w4              llmpress QLoRA on an int4 g128 base (RTN), kernel-packed, codes offloaded
  qlora-w4-whole-logits the same with the logits computed whole (shows what chunking saves)
Weights are random (speed and memory do not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),  # a CPU smoke test
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def child(a: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers as tf

    sys.path.insert(0, str(ROOT))
    import llmpress as lp
    from llmpress.kernels import prepack
    from llmpress.recover import RecoverConfig, add_lora, recover
    from llmpress.recover.train import _rows

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**SHAPES[a.shape], max_position_embeddings=4096)
    cuda = torch.cuda.is_available()
    if not cuda:  # smoke test of the script's logic only
        torch.cuda.synchronize = torch.cuda.reset_peak_memory_stats = torch.cuda.empty_cache = lambda *x: None
        torch.cuda.memory_allocated = torch.cuda.max_memory_allocated = lambda *x: 0
        torch.cuda.get_device_name = lambda *x: "cpu"
    with torch.device("cuda" if cuda else "cpu"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    v = a.child
    if v.startswith("qlora"):
        lp.compress(model, lp.recipe("w4a16-rtn", group_size=128), progress=False)
        prepack(model, torch.bfloat16, offload_codes=True)
    torch.cuda.synchronize()
    weights_gb = torch.cuda.memory_allocated() / 2**30
    tokens = torch.randint(0, cfg.vocab_size, (64, a.seqlen), generator=torch.Generator().manual_seed(1))
    rc = RecoverConfig(steps=a.steps, lr=1e-4, batch_size=a.batch_size, kd="none", ce_weight=1.0, warmup=1,
                       loss_chunk=0 if v.endswith("whole-logits") else 128)
    if v == "peft-lora-bf16":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=TARGETS))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def run(n: int, first: int) -> list[float]:
            out = []
            for step in range(first, first + n):
                opt.zero_grad(set_to_none=True)
                ids = tokens[_rows(tokens.shape[0], step, 0, rc)].to(model.device)
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                out.append(float(loss))
            return out

        run(2, 0)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        losses = run(a.steps, 2)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    else:
        add_lora(model, r=a.rank, alpha=2 * a.rank)
        warm = RecoverConfig(**{**rc.__dict__, "steps": 2})
        recover(model, tokens, None, warm, progress=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rep = recover(model, tokens, None, rc, progress=False)
        torch.cuda.synchronize()
        secs, losses = rep.seconds, rep.losses
    return {"variant": v, "shape": a.shape, "steps": a.steps, "batch": a.batch_size, "seqlen": a.seqlen,
            "weights_gb": weights_gb, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
            "tokens_per_s": a.steps * a.batch_size * a.seqlen / secs, "seconds": secs,
            "first_loss": losses[0], "last_loss": losses[-1], "device": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--variants", default="peft-lora-bf16,lora-bf16,qlora-w4,qlora-w4-whole-logits")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    rows = []
    for v in a.variants.split(","):
        cmd = [sys.executable, __file__, "--child", v, "--shape", a.shape, "--steps", str(a.steps), "--batch-size",
               str(a.batch_size), "--seqlen", str(a.seqlen), "--rank", str(a.rank)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            print(f"{v} failed:\n{r.stderr[-4000:]}", flush=True)
            rows.append({"variant": v, "error": r.stderr[-1500:]})
            continue
        rows.append(json.loads(line[0][7:]))
        print(rows[-1], flush=True)
    ok = [r for r in rows if "error" not in r]
    ref = next((r for r in ok if r["variant"] == "peft-lora-bf16"), None)
    for r in ok:
        if ref:
            r["throughput_vs_peft"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["memory_vs_peft"] = r["peak_gpu_gb"] / max(ref["peak_gpu_gb"], 1e-9)
    out = Path(a.out) / f"recover-gpu-{a.shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"{'variant':24s} {'weights GB':>10s} {'peak GB':>8s} {'tok/s':>8s} {'x peft':>7s} {'mem/peft':>8s}")
    for r in ok:
        print(f"{r['variant']:24s} {r['weights_gb']:10.2f} {r['peak_gpu_gb']:8.2f} {r['tokens_per_s']:8.0f} "
              f"{r.get('throughput_vs_peft', float('nan')):7.2f} {r.get('memory_vs_peft', float('nan')):8.2f}")


if __name__ == "__main__":
    main()
