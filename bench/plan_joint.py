"""How far the sum of single-unit costs is from the joint KL, per candidate setting, and a plan
from costs scaled by that ratio (smollm2-135m, CPU).

For each setting (bits, group) that fits every planned unit, every unit is solved at it (the
same GPTQ solve the sensitivity used) and the model's output KL to the float model is measured
on the same direct samples; ratio = joint / sum of the units' measured single costs. The costs
of every option are then multiplied by its setting's ratio and the budget is planned again;
the plan is compressed by `llmpress compress` and evaluated on the pinned wiki protocol.

  python bench/plan_joint.py --sens /tmp/plan-ho/sensitivity.json --n-fit 32 --target 3.0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llmpress as lp  # noqa: E402
from llmpress.models import linear_weight  # noqa: E402
from llmpress.plan import Sensitivity, allocate, uniform  # noqa: E402
from llmpress.plan.sensitivity import _Direct, _hessians, _solve, _targets, candidates  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sens", required=True, help="a sensitivity file measured with --direct")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-sens", type=int, default=16)
    ap.add_argument("--n-fit", type=int, default=0, help="as the sensitivity run: samples after the scored ones the solvers fit on")
    ap.add_argument("--direct", type=int, default=2)
    ap.add_argument("--targets", default="3.0")
    ap.add_argument("--work", default="/tmp/plan-joint")
    ap.add_argument("--out", default="bench/results/plan-joint-smollm2-135m.json")
    a = ap.parse_args()
    sens = Sensitivity.load(a.sens)
    model = lp.load(a.model)
    tokens = lp.data.calibration("wiki").tokens(model.llmpress_tokenizer)
    step = sens.base_step()
    mods = _targets(model, step)
    owner = {n: u.names[0] for u in sens.units for n in u.names}
    fit = tokens[a.n_sens : a.n_sens + a.n_fit] if a.n_fit else tokens[: a.n_sens]
    hess = _hessians(model, mods, owner, fit, 2, True)
    direct = _Direct(model, tokens[: a.direct], 2)
    settings = sorted({(o.bits, o.group_size) for u in sens.units for o in u.options})
    ratio, rows = {}, []
    for b, g in settings:
        try:
            single = uniform(sens, b, g).kl
        except Exception:  # noqa: BLE001 - a setting some unit lacks has no uniform allocation
            continue
        t0 = time.perf_counter()
        c = candidates(step, [b], [g])[0]
        weights = {}
        for n, m in mods.items():
            w = linear_weight(m).detach()
            weights[m] = _solve(w, hess[owner[n]], c, n).dequantize(torch.float32).to(w.dtype)
        joint = direct.kl(0, weights)
        ratio[(b, g)] = joint / single
        rows.append(dict(bits=b, group_size=g, joint_kl=joint, sum_single_kl=single, ratio=joint / single,
                         seconds=time.perf_counter() - t0))
        print(f"w{b} g{g}: joint {joint:.4f}, sum of single {single:.4f}, ratio {joint / single:.2f}", flush=True)
    scaled = copy.deepcopy(sens)
    for u in scaled.units:
        for o in u.options:
            o.kl *= ratio.get((o.bits, o.group_size), max(ratio.values()))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    plans = []
    for t in a.targets.split(","):
        p = allocate(scaled, target_bits=float(t))
        counts: dict = {}
        for i in range(len(p.choice)):
            k = f"w{p.option(i).bits} g{p.option(i).group_size}"
            counts[k] = counts.get(k, 0) + len(scaled.units[i].names)
        name = f"plan-joint-{t}bpw"
        y = work / f"{name}.yaml"
        y.write_text(p.to_yaml(name))
        subprocess.run([sys.executable, "-m", "llmpress", "compress", a.model, "--recipe", str(y), "-o", str(work / name),
                        "--overwrite", "--json", str(work / f"{name}.report.json")], check=True)
        plans.append(dict(name=name, target=float(t), avg_bits=p.avg_bits, predicted_kl=p.kl, layers_per_setting=counts,
                          path=str(work / name)))
        print(name, counts, flush=True)
    base = lp.load(a.model)
    ev = lp.evaluate_many({r["name"]: lp.load(r["path"]) for r in plans}, base, n_windows=24,
                          paths={r["name"]: r["path"] for r in plans})
    for r in plans:
        r.pop("path")
        e = ev[r["name"]]
        r.update(ppl=e.ppl, kl=e.kl, top1=e.top1, size_mb=e.size_mb, bits_per_weight=e.bits_per_weight)
        print(f"{r['name']}: {r['avg_bits']:.3f} bits, {r['size_mb']:.2f} MB, ppl {e.ppl:.2f}, KL {e.kl:.4f}, top-1 {e.top1:.4f}")
    Path(a.out).write_text(json.dumps(dict(sensitivity=a.sens, n_fit=a.n_fit, direct_samples=a.direct, ratios=rows,
                                           plans=plans, machine="2-core CPU, fp32"), indent=1))


if __name__ == "__main__":
    main()
