"""Loading models (HF directory, .gguf, hub id, named asset, llmpress checkpoint) and finding
their decoder blocks and linear layers without per-architecture tables."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from llmpress import assets

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


class UnsupportedModelError(ValueError):
    """The model's structure is not one llmpress can walk; the message names what is missing."""


def _is_linear(m: nn.Module) -> bool:
    from llmpress.nn import CompressedLinear

    return isinstance(m, (nn.Linear, CompressedLinear)) or type(m).__name__ == "Conv1D"


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (transformers' Conv1D stores it transposed)."""
    return m.weight.t() if type(m).__name__ == "Conv1D" else m.weight


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of decoder blocks: the longest nn.ModuleList whose every entry holds linears."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if all(any(_is_linear(x) for x in blk.modules()) for blk in mod):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no stack of decoder blocks (an nn.ModuleList whose "
            "blocks contain nn.Linear / Conv1D layers); llmpress supports decoder-only "
            "transformers built from such blocks"
        )
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n_layers is not None and n_layers != len(best[1]):
        log.warning("%s: block stack %s has %d entries, config says %d layers",
                    type(model).__name__, best[0], len(best[1]), n_layers)
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear-like submodules of one block, by name relative to the block, in forward order."""
    return {n: m for n, m in block.named_modules() if n and _is_linear(m)}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", s)) and not s.startswith((".", "/"))


def _attach_tokenizer(model: nn.Module, src: str, **kw) -> None:
    from transformers import AutoTokenizer

    try:
        model.llmpress_tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer found at %s (%s); pass one to compress/evaluate", src, e)
        model.llmpress_tokenizer = None


def load(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a causal LM from a named asset (``smollm2-135m``), a local HF directory
    (safetensors only), a ``.gguf`` file, an llmpress / compressed-tensors checkpoint, or a
    hub id when online. The tokenizer is attached as ``model.llmpress_tokenizer``."""
    from transformers import AutoModelForCausalLM

    src = str(source)
    gguf_src = None
    if src in assets.MODELS:
        gguf_src = str(assets.model_gguf(src))
        src = str(assets.model_path(src))
    p = Path(src)
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"{p} is a file but not GGUF (magic {magic!r}); pass a model directory or a .gguf file")
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
        model.hf_quantizer = None  # dequantized on load; plain dense weights from here on
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _attach_tokenizer(model, str(p.parent), gguf_file=p.name)
        gguf_src = str(p)
    elif p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} has no config.json; is it a Hugging Face model directory?")
        cfg = json.loads((p / "config.json").read_text())
        if not any(p.glob("*.safetensors")):
            pickles = [x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            raise ValueError(
                f"{p} has no *.safetensors weights" + (f" (found {pickles})" if pickles else "")
                + "; llmpress reads only safetensors (pickle files can run code). Convert with "
                "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)` "
                "in a trusted environment"
            )
        qc = cfg.get("quantization_config") or {}
        if qc.get("quant_method") == "compressed-tensors" or cfg.get("llmpress_lowrank"):
            from llmpress.formats.compressed_tensors import load_compressed

            model = load_compressed(p, dtype=dtype, trust_remote_code=trust_remote_code)
        elif qc.get("quant_method") == "bitsandbytes":
            from llmpress.formats.bnb import load_bnb

            model = load_bnb(p, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    str(p), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
                )
            except ValueError as e:
                if "Unrecognized configuration class" not in str(e) and "does not recognize" not in str(e):
                    raise
                raise UnsupportedModelError(
                    f"{cfg.get('architectures') or cfg.get('model_type')} (model_type "
                    f"{cfg.get('model_type')!r}) is not a causal language model transformers can load "
                    "with AutoModelForCausalLM; llmpress compresses decoder-only LMs"
                ) from None
        _attach_tokenizer(model, str(p), trust_remote_code=trust_remote_code)
    elif _looks_like_hub_id(src) and not p.exists():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
            )
        except OSError as e:
            raise FileNotFoundError(
                f"could not load {src!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
                "If this machine is offline, download the model elsewhere and pass its local "
                f"directory, or use a built-in asset: {sorted(assets.MODELS)}"
            ) from e
        _attach_tokenizer(model, src, trust_remote_code=trust_remote_code)
    else:
        raise FileNotFoundError(
            f"no such model: {src!r} is not a file, a directory, a hub id (org/name), nor a "
            f"built-in asset {sorted(assets.MODELS)}"
        )
    model.eval()
    model.llmpress_source = src
    if gguf_src is not None:
        model.llmpress_gguf_source = gguf_src  # the GGUF writer copies its tokenizer fields
    elif p.is_dir() and (p / "llmpress_gguf.json").exists():
        model.llmpress_gguf_tokenizer = json.loads((p / "llmpress_gguf.json").read_text())
    return model.to(device)
