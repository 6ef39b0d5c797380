"""QLoRA vs LoRA: peak memory and training throughput on smollm2-135m (CPU), each variant in its own
process (peak RSS is per process), same batches, same optimizer, causal-LM loss (no teacher, so
the figures are the student's alone).

  python bench/recover_memory.py --steps 12 --out bench/results

Variants: llmpress LoRA on the fp32 base; llmpress QLoRA on the w4a16-rtn g64 checkpoint
(compressed once beforehand, loaded as saved), each with the logits computed 128 tokens at a
time (the default) and whole ("-whole-logits"); plain transformers + peft LoRA on the fp32 base
(the reference for the throughput ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
ROOT = Path(__file__).resolve().parents[1]


def child(variant: str, steps: int, bs: int, seqlen: int, rank: int, ckpt: str | None) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import llmpress as lp
    from llmpress.recover import RecoverConfig, add_lora, recover

    torch.manual_seed(0)
    model = lp.load(ckpt if variant.startswith("qlora-w4") else "smollm2-135m")  # the 4-bit model as saved, not compressed here
    tok = model.llmpress_tokenizer
    tokens = lp.data.calibration("wiki", n_samples=max(steps * bs, 8), seqlen=seqlen, seed=1).tokens(tok)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = RecoverConfig(steps=steps, lr=1e-4, batch_size=bs, kd="none", ce_weight=1.0, warmup=1,
                        loss_chunk=0 if variant.endswith("whole-logits") else 128)
    if variant in ("lora-fp32", "qlora-w4", "lora-fp32-whole-logits", "qlora-w4-whole-logits"):
        add_lora(model, r=rank, alpha=2 * rank)
        rep = recover(model, tokens, None, cfg, progress=False)
        secs, losses = rep.seconds, rep.losses
    else:  # transformers + peft, the same loop written plainly
        import peft
        import torch.nn.functional as F

        from llmpress.recover.train import _rows

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        losses = []
        t0 = time.perf_counter()
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            ids = tokens[_rows(tokens.shape[0], step, 0, cfg)]
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "steps": steps, "tokens_per_s": steps * bs * seqlen / secs, "seconds": secs,
            "peak_rss_mb": rss, "rss_after_load_mb": rss_model, "first_loss": losses[0], "last_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child")
    ap.add_argument("--ckpt")
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.steps, a.batch_size, a.seqlen, a.rank, a.ckpt)))
        return
    import tempfile

    ckpt = Path(tempfile.mkdtemp(prefix="llmpress-w4-")) / "w4"
    subprocess.run([sys.executable, "-m", "llmpress.cli", "compress", "smollm2-135m", "-r", "w4a16-rtn", "-g", "64",
                    "-o", str(ckpt)], check=True, capture_output=True)
    rows = []
    for v in ("peft-lora-fp32", "lora-fp32-whole-logits", "lora-fp32", "qlora-w4-whole-logits", "qlora-w4"):
        r = subprocess.run([sys.executable, __file__, "--child", v, "--steps", str(a.steps), "--batch-size",
                            str(a.batch_size), "--seqlen", str(a.seqlen), "--rank", str(a.rank), "--ckpt", str(ckpt)],
                           capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            raise SystemExit(f"{v} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
        print(rows[-1], flush=True)
    ref = rows[0]["tokens_per_s"]
    for r in rows:
        r["throughput_vs_peft"] = r["tokens_per_s"] / ref
    out = Path(a.out) / "recover-memory-smollm2-135m.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "smollm2-135m", "rows": rows}, indent=1))
    print(f"{'variant':16s} {'peak RSS MB':>12s} {'tok/s':>8s} {'x peft':>7s}")
    for r in rows:
        print(f"{r['variant']:16s} {r['peak_rss_mb']:12.0f} {r['tokens_per_s']:8.1f} {r['throughput_vs_peft']:7.2f}")


if __name__ == "__main__":
    main()
