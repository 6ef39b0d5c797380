"""Recovery by knowledge distillation on smollm2-135m (pinned wiki protocol): compress, measure,
train on the calibration split only (the evaluation articles are never seen), measure again,
report the share of the perplexity gap closed.

  python bench/recover.py --start sparse50-wanda --steps 80 --out bench/results          # LoRA-KD
  python bench/recover.py --start w3a16-gptq --steps 80 --out bench/results              # LoRA-KD
  python bench/recover.py --start w3a16-gptq --method qat --learn-scales --lr 1e-4       # QAT, integer export
  python bench/recover.py --start drop25-angular --method full --lr 5e-5 --hidden-weight 1  # distil a student
  python bench/recover.py ... --teacher-cache 64   # teacher top-64 logits cached on disk first
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llmpress as lp  # noqa: E402
from llmpress.recover import RecoverConfig, add_lora, add_qat, cache_teacher, export_qat, recover  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--start", default="sparse50-wanda", help="recipe that makes the damaged model")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--n-windows", type=int, default=24)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--requant", action="store_true", help="also merge the adapters and re-compress with the start recipe")
    ap.add_argument("--method", default="lora", choices=["lora", "qat", "full"])
    ap.add_argument("--learn-scales", action="store_true", help="QAT: train the scales too")
    ap.add_argument("--scale-lr-ratio", type=float, default=0.3)
    ap.add_argument("--hidden-weight", type=float, default=0.0)
    ap.add_argument("--save", help="save the recovered model here, reload it and evaluate the reloaded copy")
    ap.add_argument("--teacher-cache", type=int, default=0, help="cache the teacher's top-k logits on disk first (k)")
    a = ap.parse_args()
    torch.manual_seed(0)
    base = lp.load("smollm2-135m")
    tok = base.llmpress_tokenizer
    student = lp.load("smollm2-135m")
    kw = {"group_size": a.group_size} if any(s in a.start for s in ("w3", "w4", "w8")) else {}
    lp.compress(student, lp.recipe(a.start, **kw), progress=False)
    ev0 = lp.evaluate(student, base, n_windows=a.n_windows)
    evb = lp.evaluate(base, base, n_windows=a.n_windows)
    n_train = max(a.steps * a.batch_size * a.grad_accum // 2, 64)  # each sequence seen about twice
    train = lp.data.calibration("wiki", n_samples=n_train, seqlen=a.seqlen, seed=1).tokens(tok)
    if a.method == "lora":
        add_lora(student, r=a.rank, alpha=2 * a.rank)
        method = f"lora-kd r{a.rank} (forward KL, T={a.temperature})"
    elif a.method == "qat":
        add_qat(student, learn_scales=a.learn_scales)
        method = f"qat-kd{' learned scales' if a.learn_scales else ''} (forward KL, T={a.temperature})"
    else:
        method = f"full-kd (forward KL, T={a.temperature})"
    if a.hidden_weight:
        method += f" + hidden x{a.hidden_weight:g}"
    cfg = RecoverConfig(steps=a.steps, lr=a.lr, batch_size=a.batch_size, grad_accum=a.grad_accum,
                        temperature=a.temperature, warmup=max(a.steps // 10, 1), train=a.method,
                        scale_lr_ratio=a.scale_lr_ratio, hidden_weight=a.hidden_weight)
    t0 = time.perf_counter()
    teacher = base
    if a.teacher_cache:
        import tempfile

        teacher = cache_teacher(base, train, Path(tempfile.mkdtemp()) / "cache", k=a.teacher_cache,
                                temperature=a.temperature)
        method += f", teacher top-{a.teacher_cache} cached"
    rep = recover(student, train, teacher, cfg)
    secs = time.perf_counter() - t0
    if a.method == "qat":  # evaluate the integer model, not the fake-quantized one
        extra_q = export_qat(student)
    ev1 = lp.evaluate(student, base, n_windows=a.n_windows)
    gap0, gap1 = ev0.ppl - evb.ppl, ev1.ppl - evb.ppl
    extra = {}
    if a.requant:  # adapters folded into the dequantized weights, then the start recipe again
        from llmpress.recover import merge_lora

        merge_lora(student)
        lp.compress(student, lp.recipe(a.start, **kw), progress=False)
        ev2 = lp.evaluate(student, base, n_windows=a.n_windows)
        extra = {"ppl_merged_requant": ev2.ppl, "kl_merged_requant": ev2.kl,
                 "gap_closed_merged_requant": (gap0 - (ev2.ppl - evb.ppl)) / gap0}
    if a.method == "qat":
        extra.update(qat_integers_moved=extra_q["integers_moved"], qat_scale_change=extra_q["scale_change"])
    if a.save:  # the exported checkpoint, read back, must give the same numbers
        lp.save(student, a.save, overwrite=True)
        ev3 = lp.evaluate(lp.load(a.save), base, n_windows=a.n_windows)
        extra.update(ppl_reloaded=ev3.ppl, kl_reloaded=ev3.kl,
                     size_mb=sum(f.stat().st_size for f in Path(a.save).glob("*.safetensors")) / 1e6)
    row = {"start": a.start + (f" g{a.group_size}" if kw else ""), "method": method,
           "steps": a.steps, "tokens_per_step": a.batch_size * a.grad_accum * a.seqlen, "base_ppl": evb.ppl,
           "ppl_before": ev0.ppl, "ppl_after": ev1.ppl, "kl_before": ev0.kl, "kl_after": ev1.kl,
           "gap_closed": (gap0 - gap1) / gap0, "peak_rss_mb": rep.peak_rss_mb, "seconds": secs,
           "train_tokens_per_s": rep.tokens_per_s, "first_loss": rep.losses[0], "last_loss": rep.losses[-1], **extra}
    print(json.dumps(row, indent=1))
    out = Path(a.out) / f"recover-smollm2-135m{a.tag}.json"
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    rows = [r for r in rows if not (r["start"] == row["start"] and r["method"] == row["method"] and r["steps"] == row["steps"])]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "smollm2-135m", "rows": rows + [row]}, indent=1))


if __name__ == "__main__":
    main()
