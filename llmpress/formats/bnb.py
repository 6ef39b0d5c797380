"""bitsandbytes 4-bit checkpoints (NF4 / FP4), the layout transformers writes for
``BitsAndBytesConfig(load_in_4bit=True)`` and reads back with bitsandbytes installed.

Per quantized linear ``name``: ``name.weight`` (uint8 [N*K/2, 1], two codes per byte, first
in the high nibble), ``name.weight.absmax`` (fp32, or uint8 with double quantization),
``name.weight.quant_map`` (the 16-value code book), with double quantization
``name.weight.nested_absmax`` and ``name.weight.nested_quant_map``, and
``name.weight.quant_state.bitsandbytes__<type>`` (the JSON of the remaining fields as uint8).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from llmpress.nn import CodebookLinear
from llmpress.quant.nf4 import CodebookWeight, code, dynamic_code


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def quantized_tensors(name: str, q: CodebookLinear) -> dict[str, torch.Tensor]:
    codes = q.codes.reshape(-1).cpu()
    w = f"{name}.weight"
    out = {
        w: ((codes[::2] << 4) | codes[1::2]).reshape(-1, 1).contiguous(),
        f"{w}.absmax": q.absmax.cpu(),
        f"{w}.quant_map": code(q.quant_type),
    }
    meta = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": _dtype_name(q.dtype),
            "shape": [q.out_features, q.in_features]}
    if q.absmax2 is not None:
        out[f"{w}.nested_absmax"] = q.absmax2.cpu()
        out[f"{w}.nested_quant_map"] = dynamic_code()
        meta.update(nested_blocksize=q.blocksize2, nested_dtype="float32", nested_offset=q.offset)
    out[f"{w}.quant_state.bitsandbytes__{q.quant_type}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    if q.bias is not None:
        out[f"{name}.bias"] = q.bias.detach().cpu()
    return out


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    from llmpress.formats.compressed_tensors import plain_tensors

    quant = {n: m for n, m in model.named_modules() if isinstance(m, CodebookLinear)}
    sd: dict[str, torch.Tensor] = {}
    for n, m in quant.items():
        sd.update(quantized_tensors(n, m))
    sd.update(plain_tensors(model, skip=tuple(f"{n}." for n in quant)))
    return sd


def quantization_config(model: nn.Module) -> dict:
    quant = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    types = {m.quant_type for m in quant}
    double = {m.absmax2 is not None for m in quant}
    blocks = {m.blocksize for m in quant}
    if len(types) > 1 or len(double) > 1 or blocks != {64}:
        raise ValueError(f"the bitsandbytes layout holds one quant type with blocksize 64 per model; got types "
                         f"{sorted(types)}, double quant {sorted(double)}, blocksizes {sorted(blocks)}")
    qnames = {n for n, m in model.named_modules() if isinstance(m, CodebookLinear)}
    skip = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in qnames)
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": types.pop(), "bnb_4bit_use_double_quant": double.pop(),
        "bnb_4bit_compute_dtype": _dtype_name(quant[0].dtype), "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip or None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def load_bnb(d: str | os.PathLike, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a bitsandbytes 4-bit checkpoint with :class:`CodebookLinear` modules holding the
    stored codes and absmax values exactly (bitsandbytes itself is not needed)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmpress.formats.compressed_tensors import _read_tensors, finish_load

    d = Path(d)
    config = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    qc = getattr(config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if not qc.get("load_in_4bit"):
        raise ValueError(f"{d}: only 4-bit bitsandbytes checkpoints (NF4 / FP4) are read; this one is 8-bit")
    del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    tensors = _read_tensors(d)
    for key in [k for k in tensors if ".weight.quant_state.bitsandbytes__" in k]:
        name = key.split(".weight.quant_state.")[0]
        meta = json.loads(bytes(tensors.pop(key).tolist()).decode())
        w = f"{name}.weight"
        packed = tensors.pop(w).reshape(-1)
        n, k = meta["shape"]
        codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: n * k].reshape(n, k)
        tensors.pop(f"{w}.quant_map", None)
        tensors.pop(f"{w}.nested_quant_map", None)
        absmax2 = tensors.pop(f"{w}.nested_absmax", None)
        cw = CodebookWeight(codes, tensors.pop(f"{w}.absmax"), meta["quant_type"], int(meta["blocksize"]), absmax2,
                            float(meta.get("nested_offset", 0.0)), int(meta.get("nested_blocksize", 256)),
                            getattr(torch, meta.get("dtype", "float32")))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                CodebookLinear(cw, tensors.pop(f"{name}.bias", None)))
    return finish_load(model, tensors, d)
