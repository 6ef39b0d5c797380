"""Check the plan's sensitivity estimates against the real thing: for a sample of units and
candidate settings, compress that unit alone (the same GPTQ solve the estimate used) and measure
the KL(base || model) of the whole model's output on calibration tokens, next to the K-FAC
prediction stored in a sensitivity file.

  python bench/plan_solo.py --sens /tmp/llmpress-plan-bench/sensitivity.json --blocks 3,11,16,25 \
      --cands 2/-1,2/32,3/-1,3/64,4/-1,4/64 --out bench/results/plan-solo-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llmpress as lp  # noqa: E402
from llmpress.models import linear_weight  # noqa: E402
from llmpress.plan import Sensitivity  # noqa: E402
from llmpress.plan.sensitivity import _Direct, _hessians, _solve, _targets  # noqa: E402


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sens", required=True)
    ap.add_argument("--blocks", default="3,11,16,25")
    ap.add_argument("--cands", default="2/-1,2/32,3/-1,3/64,4/-1,4/64")
    ap.add_argument("--n-fit", type=int, default=16, help="samples the solvers fit on (the sensitivity's)")
    ap.add_argument("--n-eval", type=int, default=8, help="samples the KL is measured on")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    sens = Sensitivity.load(a.sens)
    step = sens.base_step()
    model = lp.load(a.model)
    tokens = lp.data.calibration("wiki").tokens(model.llmpress_tokenizer)
    mods = _targets(model, step)
    owner = {}
    for u in sens.units:
        for n in u.names:
            owner[n] = u.names[0]
    t0 = time.perf_counter()
    hess = _hessians(model, mods, owner, tokens[: a.n_fit], 2, True)
    direct = _Direct(model, tokens[: a.n_eval], 4)  # the float model's block inputs and output, cached
    print(f"setup {time.perf_counter() - t0:.0f}s", flush=True)
    want = {int(b) for b in a.blocks.split(",")}
    cands = [tuple(int(v) for v in c.split("/")) for c in a.cands.split(",")]
    rows = []
    for u in sens.units:
        if u.block not in want:
            continue
        opts = {(o.bits, o.group_size): o for o in u.options}
        for c in cands:
            if c not in opts:
                continue
            t1 = time.perf_counter()
            cstep = dataclasses.replace(step, bits=c[0], group_size=c[1], strategy=None, overrides=())
            solved = {}
            for n in u.names:
                w = linear_weight(mods[n]).detach()
                solved[mods[n]] = _solve(w, hess[owner[n]], cstep, n).dequantize(torch.float32).to(w.dtype)
            kl = direct.kl(u.block, solved)
            pred = opts[c].kl if opts[c].kl_kfac is None else opts[c].kl_kfac
            kind = u.names[0].rsplit(".", 1)[1]
            rows.append(dict(unit=u.names[0], kind=kind, block=u.block, bits=c[0], group_size=c[1],
                             predicted=pred, measured=kl))
            print(f"{u.names[0]:40s} w{c[0]} g{c[1]:4d}: predicted {pred:.5f} measured {kl:.5f} "
                  f"ratio {kl / max(pred, 1e-12):.2f} ({time.perf_counter() - t1:.1f}s)", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(dict(model=a.model, n_fit=a.n_fit, n_eval=a.n_eval, rows=rows), indent=1))


if __name__ == "__main__":
    main()
