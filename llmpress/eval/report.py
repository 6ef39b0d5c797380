"""Tables for the terminal and markdown files."""

from __future__ import annotations

from typing import Any, Sequence


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) < 1e-3:
            return f"{v:.2e}"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.2f}"
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.3f}"
    return str(v)


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table (also readable in a terminal). ``columns``: (key, header) pairs."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


QUALITY_COLUMNS = [
    ("name", "model"), ("ppl", "ppl"), ("delta_ppl_pct", "Δppl %"), ("kl", "KL (nats)"),
    ("top1", "top-1"), ("size_mb", "size MB"), ("bits_per_weight", "bits/weight"),
    ("seconds", "compress s"), ("peak_rss_mb", "peak RSS MB"),
]
