"""llmpress: compress large language models, measure them honestly, save them where they run.

    import llmpress as lp
    model = lp.load("smollm2-135m")
    report = lp.compress(model, lp.recipe("w4a16-gptq", group_size=64), calib=lp.data.calibration("wiki"))
    lp.save(model, "out/")
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from llmpress import data
from llmpress.calibrate import CompressionReport
from llmpress.eval.ppl import EvalResult, evaluate, evaluate_many
from llmpress.models import UnsupportedModelError, load
from llmpress.recipe import Recipe, RecipeError, recipe

__version__ = "0.1.0"
__all__ = [
    "load", "compress", "save", "evaluate", "evaluate_many", "recipe", "data",
    "Recipe", "RecipeError", "CompressionReport", "EvalResult", "UnsupportedModelError",
]

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())


def compress(
    model: nn.Module,
    recipe: Recipe | str,
    calib: data.Calibration | torch.Tensor | None = None,
    *,
    tokenizer=None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> CompressionReport:
    """Compress ``model`` in place with ``recipe`` (a Recipe or a preset name / recipe file).

    ``calib`` is a :class:`llmpress.data.Calibration` (tokenized with the model's tokenizer)
    or a ready int64 tensor [n, seqlen]; recipes whose methods need no statistics ignore it.
    ``device`` is where blocks are calibrated (``cpu``, ``cuda``, ``cuda:1``...); the model
    stays where it is and blocks visit ``device`` one at a time.
    """
    from llmpress import calibrate
    from llmpress.recipe import recipe as _recipe

    r = _recipe(recipe) if isinstance(recipe, (str, os.PathLike)) else recipe
    tokens = None
    if r.needs_calibration:
        calib = calib if calib is not None else data.calibration()
        if isinstance(calib, data.Calibration):
            tok = tokenizer or getattr(model, "llmpress_tokenizer", None)
            if tok is None:
                raise ValueError("calibration text needs a tokenizer: pass tokenizer= or load the model with llmpress.load")
            tokens = calib.tokens(tok)
        else:
            tokens = calib
    teacher = None
    if r.recover is not None:  # the model as it is now teaches the compressed one afterwards
        import copy

        teacher = copy.deepcopy(model)
    report = calibrate.run(model, r, tokens, device=device, batch_size=batch_size, progress=progress)
    if r.recover is not None:
        tok = tokenizer or getattr(model, "llmpress_tokenizer", None)
        report.recovery = _recover_step(model, teacher, r.recover, tok, progress)
        del teacher
    model.llmpress_recipe = r
    return report


def _recover_step(model: nn.Module, teacher: nn.Module, st, tokenizer, progress: bool) -> dict:
    """Run a recipe's ``recover`` step: distil ``teacher`` into the compressed ``model``."""
    from llmpress.recover import add_qat, export_qat, recover

    if tokenizer is None:
        raise ValueError("the recover step trains on text: pass tokenizer= or load the model with llmpress.load")
    train = data.calibration(st.data, st.samples(), st.seqlen, seed=st.seed + 1).tokens(tokenizer)
    if st.train == "qat":
        add_qat(model, learn_scales=st.learn_scales, learn_weights=st.learn_weights)
    rep = recover(model, train, teacher, st.config(), progress=progress)
    out = {"step": st.describe(), "steps": rep.steps, "first_loss": rep.losses[0], "last_loss": rep.losses[-1],
           "seconds": rep.seconds, "tokens_per_s": rep.tokens_per_s, "train_sequences": int(train.shape[0])}
    if st.train == "qat":
        out["qat"] = export_qat(model)
    log.info("recovery: loss %.4f -> %.4f in %d steps (%.0f s)", out["first_loss"], out["last_loss"], rep.steps,
             rep.seconds)
    return out


def export(model: nn.Module, out: str | os.PathLike, format: str = "gguf:q8_0", *, overwrite: bool = False,
           calib: data.Calibration | torch.Tensor | None = None, imatrix: dict[str, torch.Tensor] | None = None,
           types: dict[str, str] | None = None, progress: bool = True) -> dict:
    """Write ``model`` where it is served: ``gguf:TYPE`` (llama.cpp; TYPE one of f32, f16, bf16,
    q8_0, q4_0, q4_1, q5_0, q5_1, or a K-quant mix q2_k, q3_k_s|m|l, q4_k_s|m, q5_k_s|m, q6_k)
    or ``onnx[:float32|int4]`` (onnxruntime, with a KV cache; int4 through MatMulNBits) or
    ``compressed-tensors`` (transformers, vLLM). For GGUF, ``calib`` (a
    :class:`~llmpress.data.Calibration` or token ids [n, seqlen]) computes an importance matrix
    (``imatrix``: mean squared input per column of each linear, see
    :func:`llmpress.calibrate.input_moments`) that weighs the rounding errors. Returns a summary
    of what was written. ``types`` sets the GGML type of named linears (a GGUF plan, see
    :mod:`llmpress.plan.gguf`)."""
    kind, _, arg = format.partition(":")
    if kind == "gguf":
        from llmpress.formats.gguf import save_gguf

        if calib is not None and imatrix is None:
            from llmpress import calibrate

            tokens = calib
            if isinstance(calib, data.Calibration):
                tok = getattr(model, "llmpress_tokenizer", None)
                if tok is None:
                    raise ValueError("calibration text needs a tokenizer: load the model with llmpress.load")
                tokens = calib.tokens(tok)
            imatrix = calibrate.input_moments(model, tokens, progress=progress)
        return save_gguf(model, out, arg or "q8_0", overwrite=overwrite, imatrix=imatrix, types=types,
                         progress=progress)
    if kind == "onnx":
        from llmpress.formats.onnx import save_onnx

        return save_onnx(model, out, arg or "float32", overwrite=overwrite)
    if kind == "compressed-tensors" and not arg:
        return {"file": str(save(model, out, overwrite=overwrite)), "type": "compressed-tensors"}
    raise ValueError(f"unknown export format {format!r}; allowed: gguf:<type> (e.g. gguf:q8_0, gguf:q4_k_m), "
                     "onnx[:float32|int4], compressed-tensors")


def save(model: nn.Module, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save atomically as a compressed-tensors checkpoint (transformers + vLLM load it), or in
    bitsandbytes' layout for NF4 / FP4 models (transformers loads it with bitsandbytes)."""
    import json

    from llmpress.formats import compressed_tensors, layout_for

    extra = {}
    r = getattr(model, "llmpress_recipe", None)
    if r is not None:
        extra["llmpress_recipe.json"] = json.dumps(r.to_dict(), indent=2)
    from llmpress.formats.gguf import tokenizer_hints

    from llmpress.formats.card import model_card

    extra["README.md"] = model_card(model, "compressed-tensors")
    hints = tokenizer_hints(model)
    if hints:
        extra["llmpress_gguf.json"] = json.dumps(hints, indent=2)
    return compressed_tensors.save(model, out, overwrite=overwrite, extra_files=extra, layout=layout_for(model))
