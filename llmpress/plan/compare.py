"""``llmpress compare``: compress a model with several recipes, evaluate them on the same
windows, and write a report directory: ``report.md``, ``report.json``, ``report.html``
(standalone, images inlined), ``pareto.png`` (size vs perplexity, Pareto front marked) and one
``bits-<recipe>.png`` heat map (blocks x layers) per recipe whose bits vary by layer.

Each PNG carries the plotted data and the pixel position of every point in a ``llmpress``
text chunk, so a reader (or a test) can check the picture against ``report.json``.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Sequence

from llmpress.eval.report import table

log = logging.getLogger(__name__)

COLUMNS = [
    ("name", "recipe"), ("size_mb", "size MB"), ("bits_per_weight", "bits/weight"), ("ppl", "ppl"),
    ("delta_ppl_pct", "Δppl %"), ("kl", "KL (nats)"), ("top1", "top-1"), ("seconds", "compress s"),
    ("peak_rss_mb", "peak RSS MB"), ("pareto", "Pareto"),
]


def pareto(rows: Sequence[dict], x: str = "size_mb", y: str = "ppl") -> list[bool]:
    """Which rows no other row beats on both ``x`` and ``y`` (smaller is better for both)."""
    out = []
    for r in rows:
        dominated = any(o is not r and o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for o in rows)
        out.append(not dominated)
    return out


def _png_meta(fig, ax, points: dict) -> dict:
    """Pixel positions (from the top-left, as image readers count) of the plotted points."""
    fig.canvas.draw()
    h = fig.canvas.get_width_height()[1]
    pix = {}
    for name, (xv, yv) in points.items():
        px, py = ax.transData.transform((xv, yv))
        pix[name] = [round(float(px)), round(float(h - py))]
    return pix


def pareto_chart(rows: Sequence[dict], path: Path, title: str) -> dict:
    """Size (MB) vs perplexity, every recipe a labelled point, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["size_mb"])
    ax.plot([r["size_mb"] for r in front], [r["ppl"] for r in front], "-", color="#9ecae1", zorder=1,
            label="Pareto front")
    for r in rows:
        base = r.get("is_base")
        ax.scatter([r["size_mb"]], [r["ppl"]], s=60, zorder=2, color="#d62728" if base else "#1f77b4",
                   marker="s" if base else "o", edgecolors="none")
    ppl = [r["ppl"] for r in rows]
    if max(ppl) > 3 * min(ppl):  # one bad recipe would flatten the rest
        ax.set_yscale("log")
    ax.set_xlabel("checkpoint size (MB)")
    ax.set_ylabel("perplexity (lower is better)" + (", log scale" if ax.get_yscale() == "log" else ""))
    ax.set_title(textwrap.fill(title, 95), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    # each label to the right of its point, at its height; one that would overlap a label already
    # placed nearby moves down and gets a leader line (measured in points on the final axes)
    fig.canvas.draw()
    pt = fig.dpi / 72
    placed: list[tuple[float, float]] = []
    for r in sorted(rows, key=lambda r: -r["ppl"]):
        x, y = ax.transData.transform((r["size_mb"], r["ppl"])) / pt
        dy = 0.0
        while any(abs(x - px) < 90 and abs(y + dy - py) < 10 for px, py in placed):
            dy -= 10
        placed.append((x, y + dy))
        ax.annotate(r["name"], (r["size_mb"], r["ppl"]), textcoords="offset points", xytext=(9, dy), fontsize=8,
                    va="center", arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=4) if dy else None)
    points = {r["name"]: (r["size_mb"], r["ppl"]) for r in rows}
    meta = {"kind": "pareto", "x": "size_mb", "y": "ppl", "points": {k: list(v) for k, v in points.items()},
            "pixels": _png_meta(fig, ax, points), "marker_colors": {"base": "#d62728", "recipe": "#1f77b4"}}
    fig.savefig(path, metadata={"llmpress": json.dumps(meta)})
    plt.close(fig)
    return meta


def bits_grid(layers: Sequence[dict]) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(blocks, layer roles, bits[block][role]) from per-layer rows with 'name' and 'bits'."""
    cells: dict[tuple[int, str], float] = {}
    for r in layers:
        m = re.search(r"\.(\d+)\.(.+)$", r["name"])
        if m and r.get("bits") is not None:
            cells[(int(m.group(1)), m.group(2))] = float(r["bits"])
    blocks = sorted({b for b, _ in cells})
    roles = list(dict.fromkeys(role for _, role in sorted(cells, key=lambda k: k[0])))
    return blocks, roles, [[cells.get((b, ro)) for ro in roles] for b in blocks]


def bits_heatmap(name: str, layers: Sequence[dict], path: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks, roles, grid = bits_grid(layers)
    arr = np.array([[math.nan if v is None else v for v in row] for row in grid], dtype=float).T  # [roles, blocks]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(blocks) + 2), 0.45 * len(roles) + 1.6), dpi=100)
    im = ax.imshow(arr, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_yticks(range(len(roles)), roles, fontsize=7)
    ax.set_xlabel("block")
    ax.set_title(f"{name}: bits per weight by layer", fontsize=10)
    fig.colorbar(im, ax=ax, label="bits/weight")
    fig.tight_layout()
    meta = {"kind": "bits", "blocks": blocks, "roles": roles, "bits": grid}
    fig.savefig(path, metadata={"llmpress": json.dumps(meta)})
    plt.close(fig)
    return meta


def write_report(out: Path, model: str, rows: list[dict], layers: dict[str, list[dict]], meta: dict) -> dict:
    """Write report.md / report.json / report.html and the charts into ``out`` (which exists)."""
    for r, p in zip(rows, pareto(rows), strict=True):
        r["pareto"] = p
    charts = {"pareto": "pareto.png"}
    pareto_chart(rows, out / "pareto.png", f"{model}: size vs perplexity ({meta.get('protocol', '')})")
    for name, ls in layers.items():
        bits = {x.get("bits") for x in ls}
        if len(bits) > 1:
            f = f"bits-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
            bits_heatmap(name, ls, out / f)
            charts[f"bits:{name}"] = f
    rep = {"model": model, **meta, "rows": rows, "charts": charts, "layers": layers}
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    md = [f"# llmpress compare: {model}", "", meta.get("protocol", ""), "", table(rows, COLUMNS), "",
          "Pareto: no other recipe is both smaller and lower in perplexity.", "", "![size vs perplexity](pareto.png)", ""]
    for k, f in charts.items():
        if k.startswith("bits:"):
            md += [f"![{k[5:]} bits per layer]({f})", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html(model, meta, rows, charts, out))
    return rep


def _html(model: str, meta: dict, rows: list[dict], charts: dict, out: Path) -> str:
    from llmpress.eval.report import _fmt

    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k, _ in COLUMNS) + "</tr>" for r in rows)
    imgs = "".join(
        f'<figure><img alt="{html.escape(k)}" src="data:image/png;base64,'
        f'{base64.b64encode((out / f).read_bytes()).decode()}"><figcaption>{html.escape(k)}</figcaption></figure>'
        for k, f in charts.items())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>llmpress compare: " + html.escape(model)
            + "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "img{max-width:100%}</style></head><body>"
            f"<h1>llmpress compare: {html.escape(model)}</h1><p>{html.escape(meta.get('protocol', ''))}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{imgs}</body></html>")


def layer_bits(model) -> list[dict]:
    """Storage bits per weight of every compressed linear (scales and zero points included)."""
    from llmpress.nn import CompressedLinear

    return [dict(name=n, bits=round(m.qweight.storage_bits() / (m.out_features * m.in_features), 4))
            for n, m in model.named_modules() if isinstance(m, CompressedLinear) and hasattr(m.qweight, "storage_bits")]


def compare(
    model: str,
    recipes: Sequence[str],
    out: str | Path,
    *,
    group_size: int | None = None,
    n_windows: int = 24,
    seqlen: int = 1024,
    corpus: str = "wiki",
    calib: str = "wiki",
    n_samples: int = 64,
    keep_models: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Compress ``model`` with each recipe (a fresh ``llmpress compress`` process each, so its
    time and peak memory are its own; a failing recipe is reported, the others go on), evaluate
    all against the base on the same windows, and write the report directory ``out``."""
    import llmpress as lp
    from llmpress.formats.compressed_tensors import atomic_dir

    out = Path(out)
    with atomic_dir(out, overwrite) as tmp, tempfile.TemporaryDirectory(prefix="llmpress-compare-") as work:
        store = (tmp / "models") if keep_models else Path(work)
        store.mkdir(exist_ok=True)
        done: dict[str, dict] = {}
        failed: dict[str, str] = {}
        for r in recipes:
            name = Path(r).stem if Path(r).suffix in (".yaml", ".yml", ".json") else r
            dst, rep = store / name, Path(work) / f"{name}.json"
            cmd = [sys.executable, "-m", "llmpress", "compress", model, "--recipe", r, "-o", str(dst), "--overwrite",
                   "--json", str(rep), "--calib", calib, "--n-samples", str(n_samples)]
            if group_size is not None:
                cmd += ["--group-size", str(group_size)]
            if device:
                cmd += ["--device", device]
            log.info("compare: compressing with %s", r)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                failed[name] = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                log.warning("compare: %s failed: %s", name, failed[name])
                continue
            done[name] = json.loads(rep.read_text()) | {"path": str(dst)}
        if not done:
            raise RuntimeError("every recipe failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        base = lp.load(model)
        models = {"base": base} | {k: lp.load(v["path"]) for k, v in done.items()}
        ev = lp.evaluate_many(models, base, source=corpus, seqlen=seqlen, n_windows=n_windows,
                              paths={k: v["path"] for k, v in done.items()}, progress=progress)
        rows = [dict(name="base", is_base=True, **ev["base"].to_dict(), delta_ppl_pct=0.0)]
        layers: dict[str, list[dict]] = {}
        for k, v in done.items():
            e = ev[k]
            comp = v["compression"]
            rows.append(dict(name=k, is_base=False, **e.to_dict(), delta_ppl_pct=100 * (e.ppl / ev["base"].ppl - 1),
                             seconds=comp["seconds"], peak_rss_mb=v.get("peak_rss_mb", comp["peak_rss_mb"]),
                             predicted_peak_mb=v.get("prediction", {}).get("peak_rss_mb"),
                             predicted_size_mb=v.get("prediction", {}).get("disk_mb"), recipe=v["recipe"]))
            layers[k] = layer_bits(models[k])
        protocol = f"{corpus}: {ev['base'].tokens} tokens in {n_windows} x {seqlen} windows; calibration {calib} {n_samples} samples"
        rep = write_report(tmp, model, rows, layers, {"protocol": protocol, "failed": failed})
    return rep
