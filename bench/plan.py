"""Budgeted mixed-precision plans vs uniform recipes on smollm2-135m (pinned wiki protocol).

Measures per-unit sensitivity once (K-FAC KL estimates for GPTQ at every candidate bits x group
size), plans at each target average bits/weight, then compresses every plan and every uniform
comparator with the same GPTQ step through `llmpress compress` (a fresh process each, so its
peak RSS is its own), saves it, and evaluates all of them against the base in one pass.

  python bench/plan.py --targets 3.0,3.5,4.0 --uniform 2/32,3/-1,3/64,3/32 --out bench/results
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llmpress as lp  # noqa: E402
from llmpress.plan import Sensitivity, allocate, measure, uniform  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="w4a16-gptq")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--group-sizes", default="32,64,128,-1")
    ap.add_argument("--targets", default="3.0,3.5,4.0")
    ap.add_argument("--uniform", default="2/32,3/-1,3/64,3/32")
    ap.add_argument("--n-sens", type=int, default=16, help="calibration samples the errors are scored on")
    ap.add_argument("--n-fit", type=int, default=0, help="further calibration samples the solvers fit on (0: same)")
    ap.add_argument("--direct", type=int, default=0, help="samples each candidate's real output KL is measured on (0: K-FAC only)")
    ap.add_argument("--also-kfac", action="store_true", help="with --direct: also plan from the same run's K-FAC estimates")
    ap.add_argument("--asym-bits", default="", help="bit widths with an asymmetric (zero-point) candidate too")
    ap.add_argument("--reuse", help="a sensitivity file measured with the same --n-sens / --n-fit / --direct: only the "
                    "asymmetric candidates of --asym-bits are measured, on the same samples, and merged into it")
    ap.add_argument("--n-windows", type=int, default=24)
    ap.add_argument("--work", default="/tmp/llmpress-plan-bench")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--report-only", action="store_true", help="redraw the report from the saved results JSON")
    a = ap.parse_args()
    if a.report_only:
        res = json.loads((Path(a.out) / f"plan-{a.model}.json").read_text())
        report(res, Sensitivity.load(Path(a.work) / "sensitivity.json"), Path(a.out) / f"plan-{a.model}-report")
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sens_file = work / "sensitivity.json"
    step = lp.recipe(a.preset).steps[0]
    asym = [int(b) for b in a.asym_bits.split(",") if b.strip()]
    if sens_file.exists():
        sens = Sensitivity.load(sens_file)
    else:
        model = lp.load(a.model)
        tokens = lp.data.calibration("wiki").tokens(model.llmpress_tokenizer)
        kw = dict(name=a.model, fit_tokens=tokens[a.n_sens : a.n_sens + a.n_fit] if a.n_fit else None,
                  direct_tokens=tokens[: a.direct] if a.direct else None)
        groups = [int(g) for g in a.group_sizes.split(",")]
        if a.reuse:  # the same samples, only the new candidates
            more = measure(model, tokens[: a.n_sens], dataclasses.replace(step, symmetric=False), asym, groups, **kw)
            sens = Sensitivity.load(a.reuse).merge(more)
        else:
            sens = measure(model, tokens[: a.n_sens], step, [int(b) for b in a.bits.split(",")], groups,
                           asym_bits=asym, **kw)
        sens.save(sens_file)
        del model
    print(f"sensitivity: {len(sens.units)} units, {sens.tokens} tokens, {sens.seconds:.0f}s", flush=True)

    plans = {}
    for t in a.targets.split(","):
        p = allocate(sens, target_bits=float(t))
        plans[f"plan-{t}bpw"] = p
    if a.also_kfac and any(o.kl_kfac is not None for u in sens.units for o in u.options):
        # the same run's K-FAC estimates alone, planned the same way (what --direct changes)
        kf = copy.deepcopy(sens)
        for u in kf.units:
            for o in u.options:
                if o.kl_kfac is not None:
                    o.kl = o.kl_kfac
        for t in a.targets.split(","):
            plans[f"plan-kfac-{t}bpw"] = allocate(kf, target_bits=float(t))
    for u in filter(None, a.uniform.split(",")):  # "3/-1", or "3/-1a" asymmetric
        b, g = (int(x) for x in u.rstrip("a").split("/"))
        plans[f"uniform-w{b}g{g}" + ("a" if u.endswith("a") else "")] = uniform(sens, b, g, False if u.endswith("a") else None)

    rows = []
    for name, p in plans.items():
        rfile = work / f"{name}.yaml"
        rfile.write_text(p.to_yaml(name))
        out = work / name
        rep = work / f"{name}.report.json"
        if not rep.exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "llmpress", "compress", a.model, "--recipe", str(rfile), "-o", str(out),
                            "--overwrite", "--json", str(rep)], check=True)
            print(f"{name}: compressed in {time.perf_counter() - t0:.0f}s", flush=True)
        r = json.loads(rep.read_text())
        pred = r["prediction"]  # made by the compress process from config.json before loading
        rows.append(dict(name=name, target=p.target, avg_bits=p.avg_bits, predicted_size_mb=p.size_mb,
                         predicted_kl=p.kl, measured_peak_mb=r["peak_rss_mb"], predicted_peak_mb=pred["peak_rss_mb"],
                         compress_s=r["compression"]["seconds"], predicted_s=pred["seconds"], path=str(out)))

    base = lp.load(a.model)
    models = {r["name"]: lp.load(r["path"]) for r in rows}
    ev = lp.evaluate_many(models, base, n_windows=a.n_windows, paths={r["name"]: r["path"] for r in rows})
    evb = lp.evaluate(base, n_windows=a.n_windows)
    for r in rows:
        e = ev[r["name"]]
        r.update(ppl=e.ppl, kl=e.kl, top1=e.top1, size_mb=e.size_mb, bits_per_weight=e.bits_per_weight)
    for r in rows:
        if r["name"].startswith("plan"):
            peers = [u for u in rows if u["name"].startswith("uniform") and u["size_mb"] >= r["size_mb"] - 1e-6
                     and u["avg_bits"] <= r["avg_bits"] + 0.3]
            best = min(peers, key=lambda u: u["kl"]) if peers else None
            r.update(uniform_best=best and best["name"], uniform_best_ppl=best and best["ppl"],
                     uniform_best_kl=best and best["kl"], uniform_best_size_mb=best and best["size_mb"])
    res = dict(model=a.model, preset=a.preset, base_ppl=evb.ppl, base_size_mb=evb.size_mb, sensitivity=dict(
        units=len(sens.units), tokens=sens.tokens, seconds=sens.seconds, bits=a.bits, group_sizes=a.group_sizes,
        asym_bits=a.asym_bits, reused=a.reuse),
        machine="2-core CPU, fp32", rows=rows, command="python " + " ".join(sys.argv), date=time.strftime("%Y-%m-%d"))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"plan-{a.model}.json").write_text(json.dumps(res, indent=1))
    report(res, sens, Path(a.out) / f"plan-{a.model}-report")
    cols = ["name", "avg_bits", "size_mb", "predicted_size_mb", "ppl", "kl", "predicted_kl", "top1",
            "measured_peak_mb", "predicted_peak_mb"]
    print("| " + " | ".join(cols) + " |")
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


def report(res: dict, sens: Sensitivity, out: Path) -> None:
    """The same report `llmpress compare` writes (table, Pareto PNG, bits-per-layer heat maps
    of the plans, standalone HTML), from the bench's rows."""
    from llmpress.plan.compare import write_report

    out.mkdir(parents=True, exist_ok=True)
    rows = [dict(name="base", is_base=True, size_mb=res["base_size_mb"], ppl=res["base_ppl"], kl=0.0, top1=1.0,
                 delta_ppl_pct=0.0)]
    layers = {}
    for r in res["rows"]:
        rows.append(dict(name=r["name"], is_base=False, size_mb=r["size_mb"], bits_per_weight=r["bits_per_weight"],
                         ppl=r["ppl"], delta_ppl_pct=100 * (r["ppl"] / res["base_ppl"] - 1), kl=r["kl"], top1=r["top1"],
                         seconds=r["compress_s"], peak_rss_mb=r["measured_peak_mb"]))
        if r["name"].startswith("plan-") and not r["name"].startswith("plan-kfac-"):
            p = allocate(sens, target_bits=float(r["name"][5:-3]))
            layers[r["name"]] = [dict(name=x["name"], bits=x["bits"] + (32 / x["group_size"] if x["group_size"] > 0 else 0))
                                 for x in p.layers()]
    asym = res["sensitivity"].get("asym_bits")
    sym = f"symmetric, asymmetric candidates at {asym} bits" if asym else "symmetric"
    write_report(out, res["model"], rows, layers, {"protocol": f"wiki protocol (DESIGN.md §4); GPTQ, {sym}, fp32 scales"})


if __name__ == "__main__":
    main()
