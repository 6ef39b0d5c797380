"""llmcompressor on smollm2-135m (CPU, fp32), in its own virtual environment.

    .lc-venv/bin/python bench/peers/llmcompressor_run.py OUT_DIR CALIB.safetensors [rows]

Uses exactly llmpress's 64x512 calibration tokens (CALIB, written by bench/methods.py) and
saves each result as a compressed-tensors checkpoint (llmpress reads them back for the pinned
evaluation) with ``peer.json`` (settings, seconds, or the error if the peer failed on CPU).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from _record import peer_row  # bench/peers/_record.py (the script's folder is on sys.path)

MODEL = Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress")) / "models" / "smollm2-135m"


def _w(bits, group=64, sym=True, typ="int", strategy="group"):
    return {"num_bits": bits, "type": typ, "symmetric": sym, "strategy": strategy,
            "group_size": group if strategy == "group" else None}


def recipes():
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    def cg(weights, acts=None):
        return {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}

    tok_int8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    tok_fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    return {
        "lc-rtn-w4-g64": ("rtn", 4, [QuantizationModifier(config_groups=cg(_w(4)), ignore=["lm_head"])]),
        "lc-gptq-w4-g64": ("gptq", 4, [GPTQModifier(config_groups=cg(_w(4)), ignore=["lm_head"])]),
        "lc-gptq-w3-g64": ("gptq", 3, [GPTQModifier(config_groups=cg(_w(3)), ignore=["lm_head"])]),
        "lc-awq-w4-g64": ("awq", 4, [AWQModifier(config_groups=cg(_w(4, sym=False)), ignore=["lm_head"])]),
        "lc-smoothquant-gptq-w8a8": ("smoothquant+gptq", 8, [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(config_groups=cg(_w(8, strategy="channel"), tok_int8), ignore=["lm_head"])]),
        "lc-fp8-dynamic": ("fp8", 8, [QuantizationModifier(
            config_groups=cg(_w(8, typ="float", strategy="channel"), tok_fp8), ignore=["lm_head"])]),
        # pruning (bench/prune.py): unstructured 50% and 2:4, saved dense
        # ignore needs the regex: the pruning modifiers name a targeted Linear "lm_head." and would
        # otherwise prune the (tied) head and embedding
        **{f"lc-{m}-{tag}": (m, 32, [cls(sparsity=0.5, mask_structure=ms, ignore=["re:.*lm_head"])])
           for m, cls in (("sparsegpt", SparseGPTModifier), ("wanda", WandaPruningModifier))
           for tag, ms in (("50", "0:0"), ("2of4", "2:4"))},
    }


def _cpu_without_pinning() -> None:
    """llmcompressor's AWQ pins its cached activations before each scale search (a host-to-device
    transfer optimisation); on a machine without an accelerator torch refuses to pin ("Cannot
    access accelerator device when none is available"), so AWQ fails on CPU. Pinning does not
    change any value: there, the cache keeps its ordinary CPU tensors."""
    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def main() -> None:
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, calib = Path(sys.argv[1]), load_file(sys.argv[2])["tokens"]
    want = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    _cpu_without_pinning()
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    for name, (method, bits, recipe) in recipes().items():
        if want and name not in want:
            continue
        info = {"tool": "llmcompressor", "version": llmcompressor.__version__, "method": method, "bits": bits,
                "group_size": 64 if bits < 8 else -1, "settings": repr(recipe)[:400]}
        prune = method in ("sparsegpt", "wanda")
        if prune:
            info["sparsity"] = "2:4" if name.endswith("2of4") else 0.5
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(MODEL)
        with peer_row(out, name, info) as t0:
            oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
                    max_seq_length=calib.shape[1], pipeline="datafree" if method in ("rtn", "fp8") else "sequential")
            info["seconds"] = time.perf_counter() - t0
            model.save_pretrained(out / name, save_compressed=not prune)  # sparse: dense safetensors
            tok.save_pretrained(out / name)


if __name__ == "__main__":
    main()
