"""Recovery by LoRA + knowledge distillation on smollm2-135m (pinned wiki protocol): compress,
measure, train adapters on the calibration split only (the evaluation articles are never seen),
measure again, report the share of the perplexity gap closed.

  python bench/recover.py --start sparse50-wanda --steps 80 --out bench/results
  python bench/recover.py --start w3a16-gptq --steps 80 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llmpress as lp  # noqa: E402
from llmpress.recover import RecoverConfig, add_lora, recover  # noqa: E402


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
    add_lora(student, r=a.rank, alpha=2 * a.rank)
    cfg = RecoverConfig(steps=a.steps, lr=a.lr, batch_size=a.batch_size, grad_accum=a.grad_accum,
                        temperature=a.temperature, warmup=max(a.steps // 10, 1))
    t0 = time.perf_counter()
    rep = recover(student, train, base, cfg)
    secs = time.perf_counter() - t0
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
    row = {"start": a.start + (f" g{a.group_size}" if kw else ""), "method": f"lora-kd r{a.rank} (forward KL, T={a.temperature})",
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
