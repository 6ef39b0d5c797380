"""Predict a compression run's peak host memory, peak GPU memory, output size and time from the
model's config.json alone (the model is built on the meta device: shapes, no weights).

The estimate follows what ``llmpress.calibrate.run`` and the checkpoint writer hold at once:

    peak host RSS = runtime (this process, torch + transformers loaded)
                  + dense weights (params x dtype)                      the loaded model
                  + calibration (tokenizer pass over the text, block inputs n x seqlen x hidden)
                  + compressed copies made so far (int8 codes, masks, factors)
                  + max(one block's statistics + solver workspace + forward transients,
                        the checkpoint being serialised)

With ``device`` a GPU the model stays on the host and blocks visit the GPU one at a time: the
GPU holds one block, the calibration activations and that block's statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmpress.memory import MIB, available_mb, rss_mb  # noqa: F401 (tests patch them here)
from llmpress.recipe import (
    DropBlocksStep,
    LowRankStep,
    PruneStep,
    QuantStep,
    Recipe,
    ShrinkStep,
)

log = logging.getLogger(__name__)

MB = 1e6  # sizes on disk, as llmpress reports them (decimal); memory is in MiB (MIB)
# Bytes of host memory per byte of text while the tokenizer turns the calibration text into ids
# (the fast tokenizer's encoding with offsets and the int64 ids), measured with smollm2's tokenizer.
TOKENIZE_BYTES_PER_CHAR = 60.0
# What transformers' from_pretrained keeps beyond the weights (its loading machinery, heap it
# leaves behind): 208-213 MiB for 135M, 200M and 336M-parameter Llamas (transformers 5.23, CPU).
LOAD_OVERHEAD_MIB = 210.0
# Solver work per linear [n, k]: (FLOPs per n*k^2, nanoseconds per weight on the reference CPU
# whose 2048^3 fp32 matmul runs at REF_GFLOPS), fitted to smollm2-135m runs on 2 cores.
REF_GFLOPS = 140.0
SOLVER_COST = {
    "rtn": (0.0, 10.0), "nf4": (0.0, 20.0), "fp4": (0.0, 20.0), "hqq": (0.0, 100.0),
    "gptq": (110.0, 20.0), "sparsegpt": (60.0, 50.0), "awq": (0.0, 800.0),
    "magnitude": (0.0, 50.0), "wanda": (0.0, 100.0), "svd": (150.0, 20.0), "asvd": (165.0, 20.0),
}


class ResourceError(MemoryError):
    """The run would not fit; the message gives the predicted need and what is available."""


@dataclass
class Prediction:
    peak_rss_mb: float
    peak_gpu_mb: float | None
    disk_mb: float
    seconds: float
    params: int
    device: str
    parts: dict = field(default_factory=dict)  # the terms of the peak, MB

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        out = [f"predicted peak host memory  {self.peak_rss_mb:,.0f} MB"]
        if self.peak_gpu_mb is not None:
            out.append(f"predicted peak GPU memory   {self.peak_gpu_mb:,.0f} MB")
        out += [f"predicted checkpoint size   {self.disk_mb:,.1f} MB",
                f"predicted time              {_fmt_s(self.seconds)} on {self.device} (rough: +-50%)",
                "  host terms (MB): " + ", ".join(f"{k} {v:,.0f}" for k, v in self.parts.items())]
        return out


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def config_of(source: str | os.PathLike, trust_remote_code: bool = False):
    """The model's transformers config, read without touching any weight file (same sources
    and errors as :func:`llmpress.load`)."""
    from transformers import AutoConfig

    from llmpress import assets
    from llmpress.models import GGUF_MAGIC, _looks_like_hub_id

    src = str(source)
    if src in assets.MODELS:
        src = str(assets.model_path(src))
    p = Path(src)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ValueError(f"{p} is a file but not GGUF; pass a model directory or a .gguf file")
        return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} has no config.json; is it a Hugging Face model directory?")
        return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    if _looks_like_hub_id(src):
        try:
            return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
        except OSError as e:
            raise FileNotFoundError(f"could not read the config of {src!r} from the Hugging Face hub ({e}); "
                                    "offline, pass a local directory") from e
    raise FileNotFoundError(f"no such model: {src!r} is not a file, a directory, a hub id (org/name), nor a "
                            f"built-in asset {sorted(assets.MODELS)}")


def meta_model(cfg) -> nn.Module:
    """The model with every tensor on the meta device: exact shapes, no memory."""
    from transformers import AutoModelForCausalLM

    cfg = dataclasses.replace(cfg) if dataclasses.is_dataclass(cfg) else cfg
    if hasattr(cfg, "quantization_config"):
        cfg = type(cfg).from_dict({k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _header(name: str, n: int) -> float:
    """About what a safetensors header spends on ``n`` tensors named after ``name``."""
    return n * (len(name) + 90)


def _layer_storage(shape: tuple[int, int], steps: tuple, dtype_bytes: int,
                   name: str = "w" * 30) -> tuple[float, float, float]:
    """(bytes in the checkpoint, bytes of the in-memory compressed form, bytes the checkpoint
    writer creates for it: packed words, sparse values) of one linear."""
    n, k = shape
    quant = next((s for s in steps if isinstance(s, QuantStep)), None)
    prune = next((s for s in steps if isinstance(s, PruneStep)), None)
    low = next((s for s in steps if isinstance(s, LowRankStep)), None)
    if low is not None:
        from llmpress.lowrank.svd import rank_for

        r = rank_for((n, k), low.ratio)
        parts = [(r, k), (n, r)]
        # the factors replace the dense weight, which is freed (measured: no net growth)
        if quant is None:
            b = sum(a * c for a, c in parts) * dtype_bytes
            return b + _header(name, 2), 0.0, 0.0
        disk = new = 0.0
        for p in parts:
            d, _, x = _layer_storage(p, (quant,), dtype_bytes, name)
            disk, new = disk + d, new + x
        return disk, 0.0, new
    if quant is not None:
        if quant.method in ("nf4", "fp4"):  # bitsandbytes: codes, absmax, code book(s), quant state
            g = quant.group_size
            blocks = math.ceil(n * k / g)
            if quant.double_quant:
                extra = blocks + 4 * math.ceil(blocks / 256) + 1024 + 64 + 170 + _header(name, 6)
            else:
                extra = 4 * blocks + 64 + 170 + _header(name, 4)
            return n * k / 2 + extra, n * k / 2 + extra, 0.0
        sch = quant.scheme()
        groups = 1 if sch.strategy == "tensor" else (math.ceil(k / sch.group_size) if sch.strategy == "group" else 1)
        n_scales = 1 if sch.strategy == "tensor" else n * groups
        zero = 0 if sch.symmetric else n_scales * (sch.bits / 8 if not quant.float_zero else dtype_bytes)
        if sch.bits < 8 and sch.type == "int":  # pack-quantized: int32 words, a shape tensor
            new = math.ceil(k * sch.bits / 32) * 4 * n
            disk = new + 16 + _header(name, 3 + (not sch.symmetric))
        else:  # int-quantized / float-quantized: one byte per weight, written as held
            new = 0.0
            disk = n * k + _header(name, 2 + (not sch.symmetric))
        disk += n_scales * dtype_bytes + zero + (dtype_bytes + _header(name, 1) if quant.act_bits and not quant.act_dynamic else 0)
        return disk, n * k + n_scales * dtype_bytes + zero, new  # codes held as int8 until saved
    if prune is not None:  # sparse bitmask: kept values, one bit per weight, row offsets, shape
        keep = 1 - prune.sparsity if prune.pattern == "unstructured" else _nm_keep(prune.pattern)
        disk = n * k * keep * dtype_bytes + n * math.ceil(k / 8) + 8 * n + 16 + _header(name, 4)
        # pruned in place (a later quantization step keeps the mask only while the block is
        # solved); the bitmask tensors are built when the checkpoint is written
        return disk, 0.0, disk
    return n * k * dtype_bytes + _header(name, 1), 0.0, 0.0


def _nm_keep(pattern: str) -> float:
    """Fraction kept by an N:M pattern (N of every M)."""
    a, b = (int(x) for x in pattern.split(":"))
    return a / b


def _structure(model: nn.Module, recipe: Recipe) -> tuple[float, float]:
    """Fraction of blocks kept and fraction of MLP channels kept after model-shaping steps."""
    blocks, mlp = 1.0, 1.0
    n_blocks = getattr(model.config, "num_hidden_layers", None) or 1
    for st in recipe.steps:
        if isinstance(st, DropBlocksStep):
            blocks *= 1 - st.count(n_blocks) / n_blocks
        elif isinstance(st, ShrinkStep) and st.method == "shrink":
            mlp *= 1 - (st.mlp or 0)
    return blocks, mlp


def _head_params(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return 0 if head is None else head.weight.numel()


@functools.cache
def _matmul_gflops(device: torch.device) -> float:
    """A quick measurement of this device's fp32 matmul speed (GFLOP/s), once per process."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device)
    a @ a
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def predict(
    source: str | os.PathLike | nn.Module,
    recipe: Recipe,
    *,
    n_samples: int = 64,
    seqlen: int = 512,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    calib_chars: int | None = None,
    trust_remote_code: bool = False,
    runtime_mb: float | None = None,
) -> Prediction:
    """Predict the resources of ``llmpress compress SOURCE --recipe RECIPE`` (compress and save)
    from config.json alone. ``calib_chars`` is the calibration text's length (default: the
    built-in wiki split's); ``runtime_mb`` the memory the process holds before loading (default:
    this process's resident set now)."""
    from llmpress import calibrate
    from llmpress.models import block_linears, find_blocks, linear_weight

    if isinstance(source, nn.Module):
        cfg = source.config
    else:
        cfg = config_of(source, trust_remote_code)
    model = meta_model(cfg)
    device = torch.device(device)
    bpe = torch.tensor([], dtype=dtype).element_size()
    params = sum(p.numel() for p in model.parameters())
    _, blocks = find_blocks(model)
    n_blocks = len(blocks)
    keep_blocks, keep_mlp = _structure(model, recipe)
    shaping = any(isinstance(s, (DropBlocksStep, ShrinkStep)) for s in recipe.steps)
    per_layer = Recipe(tuple(s for s in recipe.steps if not isinstance(s, (DropBlocksStep, ShrinkStep))), recipe.name) \
        if any(not isinstance(s, (DropBlocksStep, ShrinkStep)) for s in recipe.steps) else None
    layers = {}
    if per_layer is not None:
        layers = calibrate.plan(model, per_layer) if not shaping else _plan_shapes(model, per_layer)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
    block_params = sum(p.numel() for p in blocks[0].parameters())

    # the checkpoint: compressed layers at their storage, everything else dense
    disk = comp_mem = save_new = 0.0
    compressed_params = 0
    scale = {}
    for name, steps in layers.items():
        w = linear_weight(model.get_submodule(name))
        f = keep_blocks * (keep_mlp if ".mlp." in name or "mlp" in name.split(".")[-2:] else 1.0) if shaping else 1.0
        d, m, x = _layer_storage(tuple(w.shape), steps, bpe, name)
        disk += d * f
        comp_mem += m * f
        save_new += x * f
        compressed_params += w.numel() * f
        scale[name] = f
    dense_params = params * 1.0
    if shaping:
        dense_params = params - block_params * n_blocks * (1 - keep_blocks) - _mlp_params(blocks[0]) * n_blocks * keep_blocks * (1 - keep_mlp)
    n_plain = len(model.state_dict()) - len(layers)
    disk += (dense_params - compressed_params) * bpe + n_plain * _header("model.layers.0.input_layernorm.weight", 1)

    # host memory
    needs_calib = recipe.needs_calibration
    chars = calib_chars if calib_chars is not None else (_wiki_calib_chars() if needs_calib else 0)
    act = n_samples * seqlen * hidden * 4 if needs_calib else 0.0
    tokenize = chars * TOKENIZE_BYTES_PER_CHAR if needs_calib else 0.0
    inter = max((linear_weight(m).shape[0] for m in block_linears(blocks[0]).values()), default=hidden)
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    fwd = batch_size * seqlen * (3 * inter + 6 * hidden) * 4 + batch_size * heads * seqlen * seqlen * 4
    stats = solver = 0.0
    if layers:
        in_dims = sorted({linear_weight(m).shape[1] for m in block_linears(blocks[0]).values()})
        wanted = {x for ss in layers.values() for st in ss for x in calibrate.needs(st)}
        if "hessian" in wanted:
            owners = _input_owners(blocks[0])
            stats = sum(k * k * 4 for k in owners)
            kmax = max(in_dims)
            nmax = max(linear_weight(m).shape[0] for m in block_linears(blocks[0]).values())
            solver = 4 * kmax * kmax * 4 + 3 * nmax * kmax * 4
        elif wanted:
            stats = sum(in_dims) * 4 * 4
    if not needs_calib:
        fwd = 0.0
        solver = max(solver, 3 * max((linear_weight(m).numel() for m in block_linears(blocks[0]).values()), default=0) * 4)
    runtime = (rss_mb() if runtime_mb is None else runtime_mb) * MIB
    weights = params * bpe
    block_peak = stats + max(solver, fwd)  # the forward's temporaries are gone when the solvers run
    for st in recipe.steps:  # block importance: every block boundary of one batch is held
        if isinstance(st, DropBlocksStep) and st.importance != "last" or isinstance(st, ShrinkStep):
            block_peak = max(block_peak, (n_blocks + 1) * batch_size * seqlen * hidden * 4 + fwd)
    # compress phase: calibration text and activations live, one block's work at a time;
    # save phase: the compressed model plus what the writer builds (packed words, bitmasks)
    host = runtime + LOAD_OVERHEAD_MIB * MIB + weights + comp_mem + max(tokenize + act + block_peak, save_new)
    parts = {k: v / MIB for k, v in dict(runtime=runtime, loading=LOAD_OVERHEAD_MIB * MIB, weights=weights,
                                         tokenize=tokenize, activations=act, compressed=comp_mem, block=block_peak,
                                         save=save_new).items()}

    gpu = None
    if device.type == "cuda":
        gpu = (block_params * bpe * 2 + act * (1 + batch_size / max(n_samples, 1)) + stats + solver + fwd) / MIB

    # time: forward passes over the calibration tokens, the solvers, reading and writing; in
    # FLOPs (or per-weight work) turned into seconds with this device's measured matmul speed.
    # The per-method constants were measured on a 2-core CPU (smollm2-135m): rough, +-50%.
    tokens = n_samples * seqlen
    flops = 0.0
    body = params - _head_params(model)
    if needs_calib:
        calibrated = [st for ss in layers.values() for st in ss if calibrate.needs(st)]
        if calibrated:  # statistics pass + re-run of every block
            flops += 2 * 2 * block_params * tokens * n_blocks * keep_blocks
        if shaping and any(isinstance(s, (DropBlocksStep, ShrinkStep)) for s in recipe.steps):
            flops += 2 * body * tokens  # one importance pass over the whole model
    ns = 0.0  # per-weight work, nanoseconds on the reference CPU
    for name, steps in layers.items():
        n, k = linear_weight(model.get_submodule(name)).shape
        for st in steps:
            meth = getattr(st, "method", "")
            cost = SOLVER_COST.get("awq" if getattr(st, "awq", False) else meth, (0.0, 100.0))
            flops += cost[0] * n * k * k * scale.get(name, 1.0)
            ns += cost[1] * n * k * scale.get(name, 1.0)
    gflops = _matmul_gflops(device if device.type == "cuda" and torch.cuda.is_available() else torch.device("cpu"))
    seconds = flops / (gflops * 1e9) + ns * 1e-9 * REF_GFLOPS / gflops + chars / 2e6 + weights / 1e9 + disk / 2e8
    return Prediction(host / MIB, gpu, disk / MB, seconds, params, str(device), parts)


def _mlp_params(block: nn.Module) -> int:
    return sum(p.numel() for n, p in block.named_parameters() if "mlp" in n)


def _plan_shapes(model: nn.Module, recipe: Recipe) -> dict:
    """The per-layer steps of ``recipe`` without the pre-run checks (shapes change first)."""
    from llmpress.models import _is_linear

    out = {}
    for name, mod in model.named_modules():
        if _is_linear(mod):
            hits = tuple(r for s in recipe.steps if (r := s.resolve(name, type(mod).__name__)) is not None)
            if hits:
                out[name] = hits
    return out


def _input_owners(block: nn.Module) -> list[int]:
    """Input widths of a block's linears, once per shared input (q/k/v, gate/up read one tensor)."""
    from llmpress.models import block_linears, linear_weight

    seen: dict[tuple, int] = {}
    for n, m in block_linears(block).items():
        k = linear_weight(m).shape[1]
        role = n.rsplit(".", 1)[0]
        key = (role, k) if n.rsplit(".", 1)[-1] not in ("o_proj", "down_proj", "c_proj", "out_proj", "dense_4h_to_h",
                                                          "fc2", "dense", "w2") else (n, k)
        seen.setdefault(key, k)
    return list(seen.values())


def _wiki_calib_chars() -> int:
    from llmpress import data

    try:
        return len(data.text("wiki", "calib"))
    except Exception:  # noqa: BLE001 - the asset may not be built yet: use its known length
        return 1_400_000


def check_fits(pred: Prediction, *, margin: float = 1.0) -> None:
    """Raise ResourceError before any weight is loaded if the prediction exceeds what is free."""
    avail = available_mb()
    if avail is not None:
        have = avail + rss_mb()  # this process's own memory counts toward the peak
        if pred.peak_rss_mb * margin > have:
            raise ResourceError(
                f"this run needs about {pred.peak_rss_mb:,.0f} MB of host memory (predicted; "
                + ", ".join(f"{k} {v:,.0f}" for k, v in pred.parts.items())
                + f" MB) but only {have:,.0f} MB is available. Use a smaller --n-samples / --batch-size, "
                "calibrate on a GPU (--device cuda), free memory, or pass --force to try anyway")
    if pred.peak_gpu_mb is not None and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(pred.device))
        if pred.peak_gpu_mb * margin > free / MIB:
            raise ResourceError(
                f"this run needs about {pred.peak_gpu_mb:,.0f} MB of GPU memory on {pred.device} (predicted) but "
                f"{free / MIB:,.0f} MB is free. Use a smaller --n-samples / --batch-size, calibrate on the CPU, or "
                "pass --force to try anyway")
