"""compressed-tensors checkpoints, the format transformers and vLLM load.

Writer, per quantized linear: ``pack-quantized`` (integer weights below 8 bits, W4A16 etc.):
``{name}.weight_packed`` (int32, dense bit packing along in_features), ``weight_scale``
[out, G], ``weight_zero_point`` (asymmetric only; packed along out_features) and
``weight_shape``; ``int-quantized`` (W8A8 int8) and ``float-quantized`` (FP8): ``weight`` in
int8 / float8_e4m3fn and ``weight_scale``; ``input_scale`` for static activation scales.
Everything else as plain tensors; ``quantization_config`` in config.json with one config
group per distinct (weights, activations, format). Reader: rebuilds the model with
:class:`~llmpress.nn.QuantLinear` modules holding exactly the stored integers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llmpress.formats import sparse
from llmpress.memory import release_memory
from llmpress.lowrank.svd import LowRankWeight
from llmpress.nn import LowRankLinear, QuantLinear
from llmpress.quant.act import ActScheme
from llmpress.quant.pack import pack_int32, unpack_int32
from llmpress.quant.primitives import QuantizedWeight, QuantScheme
from llmpress.recipe import match

log = logging.getLogger(__name__)

SHARD_BYTES = 4 * 2**30
PACKED_ZP = ("group", "channel")
# Weights compressed-tensors cannot describe (HQQ float zero points, groups along the output
# dimension) are stored like pack-quantized under this format name: llmpress reads them,
# transformers and vLLM do not. "llmpress-float-zero" is the name earlier checkpoints used.
LLMPRESS_FORMAT = "llmpress-quantized"
LLMPRESS_FORMATS = (LLMPRESS_FORMAT, "llmpress-float-zero")


class OutputExistsError(FileExistsError):
    pass


def check_output(out: str | os.PathLike, overwrite: bool = False, protect: tuple = ()) -> Path:
    """``out`` as an absolute path, after refusing a directory in ``protect`` (the input model)
    and a non-empty ``out`` unless ``overwrite``."""
    out = Path(out).absolute()
    for p in protect:
        if p and Path(p).exists() and out.resolve() == Path(p).resolve():
            raise OutputExistsError(f"refusing to write over the input model {p}; choose another output directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"output {out} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    return out


def replace_dir(new: Path, out: Path) -> None:
    """Rename the finished directory ``new`` to ``out``; an existing ``out`` is moved aside
    first and deleted only once ``new`` is in place."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "x")
        os.replace(new, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, out)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, protect: tuple = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success rename it to ``out``.

    Refuses a non-empty ``out`` unless ``overwrite``, and never replaces a directory in
    ``protect`` (the input model). On any error the temporary directory is removed and ``out``
    is untouched.
    """
    out = check_output(out, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _scheme_args(s: QuantScheme) -> dict:
    return {
        "num_bits": s.bits, "type": s.type, "symmetric": s.symmetric, "strategy": s.strategy,
        "group_size": s.group_size if s.strategy == "group" else None, "dynamic": False,
        "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {},
    } | ({"group_axis": 0} if s.group_axis == 0 else {})


def _scheme_from_args(a: dict) -> QuantScheme:
    if a.get("type", "int") not in ("int", "float") or a.get("dynamic"):
        raise ValueError(f"unsupported compressed-tensors weight scheme {a}; llmpress reads static int and fp8 weights")
    strategy = a.get("strategy") or ("group" if a.get("group_size") else "channel")
    return QuantScheme(int(a["num_bits"]), bool(a.get("symmetric", True)), strategy, a.get("group_size"),
                       a.get("type", "int"), int(a.get("group_axis", 1)))


def _act_from_args(a: dict | None) -> ActScheme | None:
    if not a:
        return None
    return ActScheme(int(a["num_bits"]), a.get("type", "int"), a.get("strategy", "token"), bool(a.get("dynamic", True)))


def layer_format(q: QuantLinear) -> str:
    """compressed-tensors format of one layer: FP8 -> float-quantized; int8 with quantized
    activations (W8A8) -> int-quantized; other integer weights -> pack-quantized."""
    if q.scheme.type == "float":
        return "float-quantized"
    if (q.zero is not None and q.zero.is_floating_point()) or q.scheme.group_axis == 0:
        return LLMPRESS_FORMAT
    if q.act is not None and q.scheme.bits == 8:
        return "int-quantized"
    return "pack-quantized"


def quantized_tensors(name: str, q: QuantLinear) -> dict[str, torch.Tensor]:
    """The tensors one quantized linear is stored as."""
    s = q.scheme
    if layer_format(q) in ("float-quantized", "int-quantized"):
        sc = q.scale.cpu() if s.strategy == "tensor" else q.scale.cpu().reshape(q.out_features, -1)
        out = {f"{name}.weight": q.qdata.cpu(), f"{name}.weight_scale": sc}
    else:
        out = {
            f"{name}.weight_packed": pack_int32(q.qdata, s.bits, dim=1).cpu(),  # packed where it is (GPU: fast)
            f"{name}.weight_scale": q.scale.cpu(),
            f"{name}.weight_shape": torch.tensor(list(q.qdata.shape), dtype=torch.int64),
        }
    if q.input_scale is not None:
        out[f"{name}.input_scale"] = q.input_scale.cpu()
    if q.zero is not None:
        z = q.zero.reshape(q.scale.shape[0], -1) if s.strategy != "tensor" else q.zero
        packed = s.strategy in PACKED_ZP and layer_format(q) == "pack-quantized"
        out[f"{name}.weight_zero_point"] = (pack_int32(z, s.bits, dim=0) if packed else z).cpu()
    if q.bias is not None:
        out[f"{name}.bias"] = q.bias.detach().cpu()
    return out


def plain_tensors(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer whose name does not start with one of ``skip``
    (tied weights once, as transformers expects)."""
    tensors = dict(model.named_parameters())  # shared (tied) parameters appear once
    for mod_name, mod in model.named_modules():
        for bname, b in mod.named_buffers(recurse=False):
            if bname not in mod._non_persistent_buffers_set:
                tensors[f"{mod_name}.{bname}" if mod_name else bname] = b
    return {k: t.detach().cpu().contiguous() for k, t in tensors.items() if not k.startswith(skip)}


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors: packed quantized linears plus every other parameter/buffer."""
    sd: dict[str, torch.Tensor] = {}
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for n, m in quant.items():
        sd.update(quantized_tensors(n, m))
        release_memory()  # packing's int64 temporaries, before they pile up as heap fragments
    sd.update(plain_tensors(model, skip=tuple(f"{n}." for n in quant)))
    for k, w in sparse.sparse_linears(model).items():  # pruned dense weights: bitmask layout
        if k in sd:
            del sd[k]
            sd.update(sparse.compress(k, w))
            release_memory()
    return sd


def quantization_config(model: nn.Module, sparsity_config: dict | None = None) -> dict | None:
    """The ``quantization_config`` entry of config.json. ``sparsity_config`` given: use it
    instead of scanning the weights for zeros (a streamed model's blocks are gone by then; only
    its modules' types and schemes are read)."""
    groups: dict[tuple[QuantScheme, str, ActScheme | None], list[str]] = defaultdict(list)
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            groups[(m.scheme, layer_format(m), m.act)].append(n)
    if sparsity_config is None:
        sparse_w = sparse.sparse_linears(model)
        sparsity_config = sparse.sparsity_config(sparse_w) if sparse_w else {}
    if not groups:
        if not sparsity_config:
            return None
        from compressed_tensors import __version__ as ct_version

        return {"quant_method": "compressed-tensors", "format": "dense", "quantization_status": "compressed",
                "config_groups": {}, "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None,
                "sparsity_config": sparsity_config, "transform_config": {}, "version": ct_version}
    quantized = {n for names in groups.values() for n in names}
    unquantized = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    config_groups = {}
    for i, ((scheme, fmt, act), names) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
        targets = ["Linear"] if len(groups) == 1 else sorted(names)
        if fmt == LLMPRESS_FORMAT:
            log.warning("%d layers have float zero points (HQQ float_zero) or output-axis groups (group_axis 0): "
                        "llmpress reads this checkpoint, transformers and vLLM do not; use float_zero: false and "
                        "group_axis 1 for them", len(names))
        config_groups[f"group_{i}"] = {
            "targets": targets, "weights": _scheme_args(scheme),
            "input_activations": None if act is None else act.ct_args(), "output_activations": None,
            "format": fmt,
        }
    formats = {f for _, f, _ in groups}
    from compressed_tensors import __version__ as ct_version

    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "config_groups": config_groups,
        "ignore": sorted(unquantized), "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": sparsity_config, "transform_config": {}, "version": ct_version,
    }


def save(model: nn.Module, out: str | os.PathLike, *, overwrite: bool = False, extra_files: dict | None = None,
         layout=None) -> Path:
    """Write ``model`` as a checkpoint directory, atomically: compressed-tensors, or the
    ``layout`` module given (e.g. :mod:`llmpress.formats.bnb`) with its own ``state_dict``
    and ``quantization_config``."""
    import sys

    layout = layout or sys.modules[__name__]
    src = getattr(model, "llmpress_source", None)
    with atomic_dir(out, overwrite, protect=(src,)) as tmp:
        sd = layout.state_dict(model)
        cfg = model.config.to_dict()
        qc = layout.quantization_config(model)
        if qc is not None:
            cfg["quantization_config"] = qc
        else:
            cfg.pop("quantization_config", None)
        lowrank = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
        if lowrank:  # factor shapes for the reader (llmpress only; transformers does not know them)
            cfg["llmpress_lowrank"] = lowrank
            log.warning("%d low-rank layers: llmpress.load reads this checkpoint, plain transformers does not",
                        len(lowrank))
        else:
            cfg.pop("llmpress_lowrank", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        _write_shards(sd, tmp)
        tok = getattr(model, "llmpress_tokenizer", None)
        if tok is not None:
            tok.save_pretrained(tmp)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    log.info("saved %s", out)
    return Path(out)


def _write_shards(sd: dict[str, torch.Tensor], d: Path) -> None:
    shards: list[dict] = [{}]
    size = 0
    for k, t in sd.items():
        nb = t.numel() * t.element_size()
        if size + nb > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nb
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], d / "model.safetensors", metadata=meta)
        return
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())}, "weight_map": {}}
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, d / fname, metadata=meta)
        index["weight_map"].update({k: fname for k in sh})
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _read_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def _config_groups(qc: dict, d) -> list[tuple]:
    """(targets, weight scheme, activation scheme, format) per config group, checked readable."""
    readable = ("pack-quantized", "int-quantized", "float-quantized", *LLMPRESS_FORMATS)
    groups = [(g["targets"], _scheme_from_args(g["weights"]), _act_from_args(g.get("input_activations")),
               g.get("format") or qc.get("format")) for g in qc.get("config_groups", {}).values()]
    for *_, fmt in groups:
        if fmt not in readable:
            raise ValueError(f"{d}: compressed-tensors format {fmt!r} is not supported yet (readable: {readable})")
    return groups


def attach_compressed(model: nn.Module, tensors: dict[str, torch.Tensor], qc: dict, dtype: torch.dtype, d) -> None:
    """Turn the stored tensors of ``qc``'s quantized layers into QuantLinear modules of ``model``
    and its bitmask-sparse weights back into dense ones, in place: what is used is popped from
    ``tensors``, the plain tensors stay for ``load_state_dict``. ``d`` names the source in errors."""
    groups = _config_groups(qc, d)
    sc = qc.get("sparsity_config") or {}
    if sc and sc.get("format") != "sparse-bitmask":
        raise ValueError(f"{d}: sparsity format {sc.get('format')!r} is not supported (readable: sparse-bitmask)")
    for key in [k[: -len(".compressed")] for k in tensors if k.endswith(".weight.compressed")]:
        tensors[key] = sparse.decompress(key, tensors).to(dtype)
    ignore = qc.get("ignore", [])
    for name in [k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")]:
        mod = model.get_submodule(name)
        cls = type(mod).__name__
        hits = [g for g in groups if any(match(t, name, cls) or match(t, name, "Linear") for t in g[0])]
        if not hits or any(match(t, name, cls) for t in ignore):
            raise ValueError(f"{d}: {name} has quantized weights but no matching config group")
        _, s, act, fmt = hits[0]
        scale = tensors.pop(f"{name}.weight_scale")
        if f"{name}.weight_packed" in tensors:
            n, k = (int(x) for x in tensors.pop(f"{name}.weight_shape"))
            q = unpack_int32(tensors.pop(f"{name}.weight_packed"), s.bits, (n, k), dim=1)
        else:
            q = tensors.pop(f"{name}.weight")
            n, k = q.shape
            q = q.to(s.qdtype)
        scale = scale.reshape(1) if s.strategy == "tensor" else scale.reshape(k if s.group_axis == 0 else n, -1)
        zero = tensors.pop(f"{name}.weight_zero_point", None)
        if zero is not None and zero.is_floating_point():
            zero = zero.reshape(scale.shape)
        elif zero is not None and s.strategy in PACKED_ZP and fmt == "pack-quantized":
            zero = unpack_int32(zero, s.bits, (n, scale.shape[1]), dim=0)
        elif zero is not None:
            zero = zero.to(torch.int8).reshape(scale.shape)
        if s.symmetric:
            zero = None
        bias = tensors.pop(f"{name}.bias", None)
        qw = QuantizedWeight(q, scale, zero, s)
        parent, _, child = name.rpartition(".")
        ql = QuantLinear(qw, bias, act, tensors.pop(f"{name}.input_scale", None))
        setattr(model.get_submodule(parent) if parent else model, child, ql)
        release_memory()  # unpacking's int64 temporaries would otherwise fragment the heap (+60% peak RSS)


def load_compressed(d: str | os.PathLike, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a pack-quantized compressed-tensors checkpoint with QuantLinear modules holding
    the stored integers, scales and zero points bit for bit."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(d)
    cfg_d = json.loads((d / "config.json").read_text())
    qc = cfg_d.get("quantization_config") or {}
    _config_groups(qc, d)  # an unreadable format fails before any weight is read
    config = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    lowrank = cfg_d.get("llmpress_lowrank") or {}
    if hasattr(config, "llmpress_lowrank"):
        del config.llmpress_lowrank
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for name, r in lowrank.items():  # factor placeholders, filled by finish_load
        mod = model.get_submodule(name)
        n, k = mod.weight.shape
        lw = LowRankWeight(torch.empty(n, int(r), device="meta", dtype=dtype),
                           torch.empty(int(r), k, device="meta", dtype=dtype))
        bias = torch.empty(n, device="meta", dtype=dtype) if getattr(mod, "bias", None) is not None else None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, LowRankLinear(lw, bias))
    tensors = _read_tensors(d)
    attach_compressed(model, tensors, qc, dtype, d)
    return finish_load(model, tensors, d)


def finish_load(model: nn.Module, tensors: dict[str, torch.Tensor], d: Path) -> nn.Module:
    """Assign the remaining plain tensors, tie weights, check nothing is missing."""
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{d}: unexpected tensors in checkpoint: {unexpected[:5]}")
    model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise ValueError(f"{d}: checkpoint is missing tensors: {still_meta[:5]}")
    if getattr(model, "generation_config", None) is not None and (d / "generation_config.json").exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(d))
    return model.eval()
