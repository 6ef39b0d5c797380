"""The model card (README.md) written next to an exported or compressed model: what it is, how
to load it, the recipe that made it and, when measured, its quality."""

from __future__ import annotations

import json
from collections import Counter

from torch import nn

LOADERS = {
    "compressed-tensors": "```python\nfrom transformers import AutoModelForCausalLM\n"
                          "model = AutoModelForCausalLM.from_pretrained(PATH)  # needs compressed-tensors\n"
                          "# or: import llmpress as lp; model = lp.load(PATH)\n```",
    "onnx": "```python\nfrom llmpress.formats.onnx import OnnxLM\nlm = OnnxLM(PATH)  # onnxruntime, CPU\n"
            "ids = lm.generate(prompt_ids, max_new_tokens=32)\n```\nInputs `input_ids`, `attention_mask`, "
            "`position_ids`, `past_key_values.{i}.key|value`; outputs `logits`, `present.{i}.key|value`.",
}


def model_card(model: nn.Module, fmt: str, *, details: list[str] | None = None,
               metrics: list[dict] | None = None) -> str:
    """Markdown: title, format and loading snippet, ``details`` lines, the layers' compression
    (counted by description), the recipe, and ``metrics`` rows (name, ppl, kl, size_mb, ...)."""
    from llmpress.nn import CompressedLinear

    name = getattr(model.config, "_name_or_path", "") or getattr(model, "llmpress_source", "") or "model"
    lines = [f"# {name} — {fmt}", "", f"Written by llmpress as {fmt}.", ""]
    if fmt.split(":")[0] in LOADERS:
        lines += [LOADERS[fmt.split(":")[0]], ""]
    lines += [f"- {d}" for d in details or []]
    kinds = Counter(m.describe() for m in model.modules() if isinstance(m, CompressedLinear))
    if kinds:
        lines += ["", "## Compressed layers", ""] + [f"- {n} x {k}" for k, n in kinds.most_common()]
    r = getattr(model, "llmpress_recipe", None)
    if r is not None:
        lines += ["", "## Recipe", "", "```json", json.dumps(r.to_dict(), indent=2), "```"]
    if metrics:
        cols = [c for c in ("name", "ppl", "kl", "top1", "size_mb", "bits_per_weight") if c in metrics[0]]
        lines += ["", "## Measured", "", "| " + " | ".join(cols) + " |", "|" + "--|" * len(cols)]
        for row in metrics:
            lines.append("| " + " | ".join(f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c))
                                           for c in cols) + " |")
    return "\n".join(lines) + "\n"
