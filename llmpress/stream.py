"""Streaming compression: a model that does not fit in host or GPU memory, one decoder block at
a time, from its safetensors shards to the output's shards; an interrupted run resumes.

The model is built on the meta device (no memory). What runs before and after the blocks
(embeddings, rotary tables, final norm, output head) is loaded for real; each block is read
from the shards (memory-mapped, straight to the calibration device) when its turn comes,
goes through the same calibration pass as :func:`llmpress.calibrate.run` (statistics, solvers,
re-run so the next block sees compressed inputs), is written to its own output shard and
freed. Peak memory is one block, its statistics and the calibration activations.

Resume: the output is assembled in ``.<out>.llmpress-partial`` beside ``out``, with
``progress.json`` (a fingerprint of the source, recipe, calibration tokens and settings, and
what each finished block recorded). A new run with the same fingerprint reloads the finished
blocks from their shards, re-runs them (forward only) to rebuild the activations, and goes on
from the first unfinished block: the output files are the same bytes as an uninterrupted
run's. The unit of work is a block and every statistic is a sum over calibration samples:
the seam a multi-GPU run uses (each process takes a share of the samples, statistics are
reduced across processes before the solve).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from llmpress import calibrate
from llmpress.formats import compressed_tensors as ct
from llmpress.formats import sparse, write_text_atomic
from llmpress.memory import peak_rss_mb, release_memory
from llmpress.models import UnsupportedModelError, find_blocks
from llmpress.recipe import MODEL_STEPS, LowRankStep, PruneStep, Recipe, RecipeError

log = logging.getLogger(__name__)
PROGRESS = "progress.json"


class ShardError(ValueError):
    """A safetensors shard is unreadable, truncated or missing tensors; the message names the file."""


class Shards:
    """The tensors of a directory of safetensors shards, by name; only headers are read up
    front, tensors are read (memory-mapped) on demand."""

    def __init__(self, d: str | os.PathLike) -> None:
        self.dir = Path(d)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.dir} has no *.safetensors shards (llmpress streams only safetensors)")
        self.where: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        self.where[k] = f
            except Exception as e:  # safetensors raises its own error types for bad headers / sizes
                raise ShardError(f"{f}: corrupted or truncated safetensors shard ({type(e).__name__}: {e})") from None
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text()).get("weight_map", {})
            missing = sorted({v for v in wm.values() if not (self.dir / v).exists()})
            if missing:
                raise ShardError(f"{index} lists shards that are not there: {missing[:5]}")

    def fingerprint(self) -> list:
        return sorted((f.name, f.stat().st_size) for f in set(self.where.values()))

    def load(self, names: list[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``names`` read from their shards onto ``device`` as ``dtype`` (floating tensors)."""
        missing = [n for n in names if n not in self.where]
        if missing:
            raise ShardError(f"{self.dir}: the shards hold no tensor {missing[:5]} (names must match the model's "
                             "state dict; checkpoints with renamed keys are not streamed)")
        by_file: dict[Path, list[str]] = defaultdict(list)
        for n in names:
            by_file[self.where[n]].append(n)
        out = {}
        dev = "cpu" if device.type == "cpu" else str(device)
        for f, ns in by_file.items():
            try:
                with safe_open(str(f), framework="pt", device=dev) as sf:
                    for n in ns:
                        t = sf.get_tensor(n)
                        out[n] = t.to(dtype) if t.is_floating_point() else t
            except Exception as e:
                raise ShardError(f"{f}: could not read {ns[0]}... ({type(e).__name__}: {e})") from None
            for n in ns:
                t = out[n]
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"{n} (in {f.name}) contains NaN or inf; refusing to compress a corrupted model")
        return out


def _fingerprint(**parts) -> str:
    h = hashlib.sha256()
    for k in sorted(parts):
        v = parts[k]
        h.update(k.encode())
        h.update(v.cpu().contiguous().numpy().tobytes() if isinstance(v, torch.Tensor)
                 else json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _skeleton(src: Path, dtype: torch.dtype | None, trust_remote_code: bool) -> tuple[nn.Module, torch.dtype]:
    """The model with meta parameters and real buffers (rotary tables), in the compute dtype."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{src} is already quantized ({config.quantization_config.get('quant_method')}); "
                         "stream a dense checkpoint")
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UnsupportedModelError(f"{src}: {config.model_type!r} is not a causal LM transformers can build ({e})") from None
    return model.eval(), dtype


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise ShardError(f"{what}: unexpected tensors {unexpected[:5]}")
    for p in module.parameters():
        p.requires_grad_(False)


def _write_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(obj: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def join_group(device: str | None) -> tuple[str | None, calibrate.Dist]:
    """Under torchrun (``WORLD_SIZE`` > 1), join the process group if not joined yet: NCCL on
    GPUs, gloo on the CPU (``LLMPRESS_DIST_BACKEND`` overrides), each rank on the GPU of its
    ``LOCAL_RANK`` (round-robin when there are fewer GPUs, which only gloo allows). Returns the
    device to calibrate on and this process's place in the group."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = (device or "").startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            device = f"cuda:{torch.cuda.current_device()}"
        dist.init_process_group(os.environ.get("LLMPRESS_DIST_BACKEND") or ("nccl" if cuda else "gloo"))
    return device, calibrate.Dist.current()


def compress_streaming(
    source: str | os.PathLike,
    recipe: Recipe,
    tokens: torch.Tensor | None,
    out: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    resume: bool = True,
    progress: bool = True,
    trust_remote_code: bool = False,
    tokenizer=None,
    activations: str = "auto",
) -> calibrate.CompressionReport:
    """Compress the safetensors checkpoint directory ``source`` into the compressed-tensors
    checkpoint ``out`` without ever holding more than one block: see the module docstring.
    ``dtype`` is the compute and storage dtype (default: the checkpoint's); ``activations``
    where the calibration activations live on a GPU run (``auto``, ``gpu``, ``host``)."""
    from llmpress import assets

    t0 = time.perf_counter()
    phases: dict[str, float] = defaultdict(float)
    clock = [t0]

    def lap(name: str) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        phases[name] += now - clock[0]
        clock[0] = now

    d = calibrate.Dist.current()
    src = Path(assets.model_path(str(source)) if str(source) in assets.MODELS else source)
    if not src.is_dir() or not (src / "config.json").exists():
        raise FileNotFoundError(f"{src}: streaming reads a Hugging Face checkpoint directory (config.json + "
                                "*.safetensors); load other sources with llmpress.load")
    if recipe.recover is not None:
        raise RecipeError("a recover step trains the whole model; run it without --stream "
                          "(or compress with --stream, then `llmpress recover` the result)")
    bad = [s for s in recipe.steps if isinstance(s, (*MODEL_STEPS, LowRankStep)) or getattr(s, "owl", False)]
    if bad:
        raise RecipeError(f"streaming compresses layer by layer; {bad[0].describe()} changes the model's "
                          "structure or needs the whole model: run it without --stream")
    if d.active and any(getattr(s, "smoothquant", None) == "auto" for s in recipe.steps):
        raise RecipeError("smoothquant: auto searches alpha on a sample of activation rows, which is not reduced "
                          "across processes yet; give a fixed alpha (e.g. smoothquant: 0.5) or run one process")
    out = ct.check_output(out, overwrite, protect=(src,))
    shards = Shards(src)
    model, dtype = _skeleton(src, dtype, trust_remote_code)
    home = torch.device("cpu")
    device = torch.device(device) if device is not None else home
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blocks_name, blocks = find_blocks(model)
    prefix = blocks_name + "."
    layers = calibrate.plan(model, recipe)
    report = calibrate.CompressionReport(recipe.name, device=str(device))
    by_block: dict[int | None, dict] = defaultdict(dict)
    for n, s in layers.items():
        by_block[calibrate._block_index(n, prefix)][n] = s
    last_calib = max((i for i, ls in by_block.items() if i is not None
                      and any(calibrate.needs(st) for ss in ls.values() for st in ss)), default=-1)
    if last_calib >= 0 and tokens is None:
        raise ValueError(f"recipe {recipe.name!r} needs calibration data; pass tokens")

    n_blocks = len(blocks)
    shard_of = [f"model-{i + 1:05d}-of-{n_blocks + 1:05d}.safetensors" for i in range(n_blocks + 1)]
    fp = _fingerprint(source=str(src.resolve()), shards=shards.fingerprint(), recipe=recipe.to_dict(),
                      tokens=tokens if tokens is not None else "none", dtype=str(dtype), batch_size=batch_size,
                      device=device.type, world=d.world)
    if d.active and tokens is not None:
        if tokens.shape[0] < d.world:
            raise ValueError(f"{tokens.shape[0]} calibration samples cannot be shared by {d.world} processes")
        report.calib_tokens = int(tokens.numel())
        tokens = d.share(tokens)  # this rank's samples; statistics are all-reduced per block
    partial = out.parent / f".{out.name}.llmpress-partial"
    state = {"fingerprint": fp, "done": 0, "blocks": {}}
    if d.rank != 0:  # rank 0 owns the files; the others follow what it decided
        d.barrier()
        state = json.loads((partial / PROGRESS).read_text())
    elif partial.exists() and resume and (partial / PROGRESS).exists():
        old = json.loads((partial / PROGRESS).read_text())
        if old.get("fingerprint") == fp:
            state = old
            log.info("resuming %s from block %d of %d", out, state["done"], n_blocks)
        else:
            log.warning("%s belongs to another run (source, recipe, data or settings differ); starting over", partial)
    if d.rank == 0:
        if state["done"] == 0 and partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        _write_json(state, partial / PROGRESS)
        d.barrier()

    # everything outside the blocks, for real (embeddings, final norm; tied weights re-tied). An
    # untied output head that stays as it is is not needed: the writer copies it from the source
    block_keys = {k for k in model.state_dict() if k.startswith(prefix)}
    outside = [k for k, t in model.state_dict().items() if k not in block_keys and t.is_meta]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_key = next((n for n, p in model.named_parameters() if head is not None and p is head.weight), None)
    lazy_head = (head_key is not None and not by_block.get(None) and head_key in shards.where
                 and not getattr(model.config, "tie_word_embeddings", False) and head_key in outside)
    present = [k for k in outside if k in shards.where and not (lazy_head and k == head_key)]
    _assign(model, shards.load(present, home, dtype), str(src))
    model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)
             and not (lazy_head and n == head_key)]
    if still:
        raise ShardError(f"{src}: the shards hold no tensor {still[:5]}")
    lap("load outside blocks")

    lap("open")
    reader = ThreadPoolExecutor(1, thread_name_prefix="llmpress-read")  # next block's weights, while this one runs
    writer = ThreadPoolExecutor(1, thread_name_prefix="llmpress-write")  # finished shards, while the next one runs

    def read(i: int) -> dict[str, torch.Tensor]:
        bp = f"{prefix}{i}."
        names = [k for k in block_keys if k.startswith(bp)]
        return {k[len(bp):]: v for k, v in shards.load(names, home, dtype).items()}

    def load_block(i: int, pending=None) -> nn.Module:
        tensors = pending.result() if pending is not None else read(i)
        _assign(blocks[i], {k: v.to(device, non_blocking=True) for k, v in tensors.items()}, f"block {i}")
        return blocks[i]

    def reload_done(i: int) -> nn.Module:  # a finished block, from its output shard
        bp = f"{prefix}{i}."
        with safe_open(str(partial / shard_of[i]), framework="pt", device="cpu" if device.type == "cpu" else str(device)) as sf:
            tensors = {k[len(bp):]: sf.get_tensor(k) for k in sf.keys()}
        ct.attach_compressed(blocks[i], tensors, state["blocks"][str(i)]["qc"] or {}, dtype, partial / shard_of[i])
        _assign(blocks[i], tensors, f"block {i} of {partial}")
        return blocks[i].to(device)

    def rest_tensors() -> tuple[dict[str, torch.Tensor], dict]:
        saved = list(blocks)
        for j in range(n_blocks):
            blocks[j] = nn.Identity()  # the rest of the model without the blocks
        try:
            if lazy_head:  # nothing outside the blocks is compressed: plain tensors, the head comes later
                return ct.plain_tensors(model, skip=(head_key,)), {}
            return ct.state_dict(model), sparse.counts(sparse.sparse_linears(model))
        finally:
            for j in range(n_blocks):
                blocks[j] = saved[j]

    def write_rest(rest: dict[str, torch.Tensor]) -> None:
        if lazy_head:
            rest.update(shards.load([head_key], home, dtype))
        _write_atomic(rest, partial / shard_of[-1])

    def write(i: int, tensors: dict[str, torch.Tensor], rec: dict) -> None:
        _write_atomic(tensors, partial / shard_of[i])
        state["blocks"][str(i)] = rec
        state["done"] = i + 1
        _write_json(state, partial / PROGRESS)  # only after the shard is on disk

    outside_work = bool(by_block.get(None))
    rest_write = None
    sparse_info: dict = {}
    if not outside_work and d.rank == 0:  # nothing outside the blocks changes: write that shard now
        rest, sparse_info = rest_tensors()
        rest_write = writer.submit(write_rest, rest)
        del rest

    inputs: list[torch.Tensor] = []
    calls: list[list[tuple]] = []
    if last_calib >= 0:
        report.calib_tokens = report.calib_tokens or int(tokens.numel())
        load_block(0)  # capture runs block 0 once, to learn what a block returns
        inputs, calls = calibrate._capture(model, blocks, tokens, batch_size, device)
        calibrate.offload(inputs, device, where=activations)
        blocks[0].to("meta")

    for i in range(state["done"]):  # resume: rebuild the activations from the finished blocks
        rec = state["blocks"][str(i)]
        report.layers.extend(rec["layers"])
        if i < last_calib:
            calibrate.rerun(reload_done(i), inputs, calls[i], device)
        blocks[i].to("meta")
        release_memory()
    lap("setup")

    bar = tqdm(range(state["done"], n_blocks), desc=f"stream {recipe.name}", unit="block", disable=not progress,
               initial=state["done"], total=n_blocks)
    pending = reader.submit(read, state["done"]) if state["done"] < n_blocks else None
    last_write = None
    traces: dict = {}  # one trace per block structure
    try:
        for i in bar:
            bp = f"{prefix}{i}."
            todo = {n[len(bp):]: s for n, s in by_block.get(i, {}).items()}
            block = load_block(i, pending)
            pending = reader.submit(read, i + 1) if i + 1 < n_blocks else None
            lap("read")
            n_before = len(report.layers)
            if todo:
                mods = calibrate.block_linears(block)
                bs = calibrate._block_stats(block, todo, mods, inputs, calls[i] if calls else [], device, d,
                                            traces=traces)
                lap("statistics")
                calibrate._compress_block(block, bp, todo, mods, bs, device, report, d)
                bs.shared.clear()
                lap("solve")
            if i < last_calib:
                calibrate.rerun(block, inputs, calls[i], device)
                lap("rerun")
            if d.rank != 0:  # rank 0 writes the shards
                block.to("meta")
                release_memory()
                continue
            tensors = {bp + k: v for k, v in ct.state_dict(block).items()}
            counts = sparse.counts(sparse.sparse_linears(block))
            rec = {"layers": report.layers[n_before:], "sparse": {bp + k: c for k, c in counts.items()},
                   "qc": ct.quantization_config(block, sparsity_config=sparse.config_from_counts(counts))}
            block.to("meta")
            lap("pack")
            if last_write is not None:
                last_write.result()  # at most one shard in flight; a failed write stops the run here
            last_write = writer.submit(write, i, tensors, rec)
            del tensors
            lap("write")
            release_memory()
            if device.type == "cuda":
                bar.set_postfix_str(f"GPU peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GB", refresh=False)
        bar.close()
        if last_write is not None:
            last_write.result()
        if rest_write is not None:
            rest_write.result()
        lap("write")
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
    inputs.clear()

    if d.rank != 0:  # rank 0 writes the rest and renames the output
        d.barrier()
        report.phases = {k: round(v, 3) for k, v in phases.items()}
        report.seconds = time.perf_counter() - t0
        report.peak_rss_mb = peak_rss_mb()
        if device.type == "cuda":
            report.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
        return report

    # outside the blocks: calibration-free methods (checked by plan), on the host
    if outside_work:
        for name, steps in by_block[None].items():
            mod = model.get_submodule(name)
            if getattr(model.config, "tie_word_embeddings", False) and name == "lm_head":
                model.config.tie_word_embeddings = False
                if isinstance(steps[0], PruneStep):
                    mod.weight = nn.Parameter(mod.weight.detach().clone(), requires_grad=False)
            calibrate._compress_block(model, "", {name: steps}, {name: mod}, calibrate._BlockStats(), home, report)
        rest, sparse_info = rest_tensors()
        _write_atomic(rest, partial / shard_of[-1])
        del rest
        lap("outside blocks")

    # config, index, tokenizer; then the partial directory becomes the output
    for i in range(n_blocks):
        sparse_info.update(state["blocks"][str(i)]["sparse"])
    cfg = model.config.to_dict()
    qc = ct.quantization_config(model, sparsity_config=sparse.config_from_counts(sparse_info))
    if qc is not None:
        cfg["quantization_config"] = qc
    (partial / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    weight_map = {}
    total = 0
    for f in shard_of:
        with safe_open(str(partial / f), framework="pt") as sf:
            for k in sf.keys():
                weight_map[k] = f
        total += (partial / f).stat().st_size
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "llmpress_gguf.json"):
        if (src / f).exists():
            shutil.copy2(src / f, partial / f)
    if tokenizer is not None and not (partial / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(partial)
    (partial / "llmpress_recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    (partial / PROGRESS).unlink()
    ct.replace_dir(partial, out)
    d.barrier()
    lap("finish")
    report.phases = {k: round(v, 3) for k, v in phases.items()}
    report.seconds = time.perf_counter() - t0
    report.peak_rss_mb = peak_rss_mb()
    if device.type == "cuda":
        report.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
    log.info("time by phase: %s", ", ".join(f"{k} {v:.1f}s" for k, v in report.phases.items()))
    log.info("streamed %d blocks (%d layers) with %s in %.1fs -> %s", n_blocks, len(report.layers), recipe.name,
             report.seconds, out)
    return report
