"""The one calibration pass: capture block inputs, hook linears, collect statistics, call the
solvers, swap compressed modules in, re-run the block so the next block sees compressed inputs.

Every method goes through here; a method declares the statistics it needs in ``SOLVERS``.
Device placement lives here only: blocks move to ``device`` one at a time, so peak memory is
about one block, its statistics and the activations of one block boundary.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress import fold, kernels
from llmpress.memory import peak_rss_mb, release_memory
from llmpress.lowrank.svd import LowRankWeight, asvd, rank_for, svd
from llmpress.models import (
    _is_linear,
    block_linears,
    find_blocks,
    linear_weight,
    set_submodule,
)
from llmpress.nn import CodebookLinear, CompressedLinear, LowRankLinear, QuantLinear
from llmpress.prune.masks import SparseWeight, magnitude, wanda
from llmpress.prune.sparsegpt import SparseGPTConfig, sparsegpt
from llmpress.quant.act import static_scale
from llmpress.quant.awq import expand_scale, reduce_absmean, search_scale
from llmpress.quant.gptq import gptq
from llmpress.quant.hqq import HQQConfig, hqq
from llmpress.quant.nf4 import CodebookWeight, quantize_4bit
from llmpress.quant.primitives import (
    QuantizedWeight,
    compute_qparams,
    dequantize,
    quantize,
)
from llmpress.quant.rtn import rtn
from llmpress.quant.smoothquant import smooth_scale
from llmpress.recipe import (
    MODEL_STEPS,
    LowRankStep,
    PruneStep,
    QuantStep,
    Recipe,
    RecipeError,
    Step,
)
from llmpress.stats import STATS

log = logging.getLogger(__name__)


# --- dispatch: method -> (solver, statistics it needs) -------------------------------------

def _solve_rtn(w: torch.Tensor, stats: dict, step: QuantStep, name: str) -> QuantizedWeight:
    # with AWQ the mse observer is AWQ's clipping search, weighted by the layer's inputs
    return rtn(w, step.scheme(), step.observer, hessian=stats.get("hessian") if step.awq else None)


def _solve_gptq(w: torch.Tensor, stats: dict, step: QuantStep, name: str) -> QuantizedWeight:
    return gptq(w, stats["hessian"], step.scheme(), step.gptq_config(), name=name, mask=stats.get("mask"))


def _solve_hqq(w: torch.Tensor, stats: dict, step: QuantStep, name: str) -> QuantizedWeight:
    return hqq(w, step.scheme(), HQQConfig(int_zero=not step.float_zero, shrink=step.range_shrink), name=name)


def _solve_codebook(w: torch.Tensor, stats: dict, step: QuantStep, name: str) -> CodebookWeight:
    return quantize_4bit(w, step.method, step.group_size, step.double_quant, name=name)


def _solve_magnitude(w: torch.Tensor, stats: dict, step: PruneStep, name: str) -> SparseWeight:
    return magnitude(w, step.pattern_())


def _solve_wanda(w: torch.Tensor, stats: dict, step: PruneStep, name: str) -> SparseWeight:
    return wanda(w, stats["sqnorm"], step.pattern_())


def _solve_sparsegpt(w: torch.Tensor, stats: dict, step: PruneStep, name: str) -> SparseWeight | QuantizedWeight:
    joint = stats.get("joint")  # the quantization step solved in the same sweep
    return sparsegpt(w, stats["hessian"], step.pattern_(), SparseGPTConfig(step.damp, step.block_size),
                     scheme=None if joint is None else joint.scheme(), name=name)


def _solve_svd(w: torch.Tensor, stats: dict, step: LowRankStep, name: str) -> LowRankWeight:
    return svd(w, rank_for(w.shape, step.ratio))


def _solve_asvd(w: torch.Tensor, stats: dict, step: LowRankStep, name: str) -> LowRankWeight:
    return asvd(w, stats["hessian"], rank_for(w.shape, step.ratio), step.damp, name=name)


Weight = QuantizedWeight | CodebookWeight | SparseWeight | LowRankWeight
SOLVERS: dict[str, tuple[Callable[..., Weight], tuple[str, ...]]] = {
    "rtn": (_solve_rtn, ()),
    "gptq": (_solve_gptq, ("hessian",)),
    "hqq": (_solve_hqq, ()),
    "nf4": (_solve_codebook, ()),
    "fp4": (_solve_codebook, ()),
    "magnitude": (_solve_magnitude, ()),
    "wanda": (_solve_wanda, ("sqnorm",)),
    "sparsegpt": (_solve_sparsegpt, ("hessian",)),
    "svd": (_solve_svd, ()),
    "asvd": (_solve_asvd, ("hessian",)),
}


def needs(step: Step) -> tuple[str, ...]:
    """The statistics a step's layers need from the calibration pass."""
    if isinstance(step, (PruneStep, LowRankStep)):
        return SOLVERS[step.method][1]
    extra: tuple[str, ...] = ("hessian", "absmean") if step.awq else ()
    if step.smoothquant is not None:
        extra += ("absmax",) + (("xsample",) if step.smoothquant == "auto" else ())
    act = step.act_scheme()
    if act is not None and not act.dynamic:
        extra += ("absmax",)
    return tuple(dict.fromkeys(SOLVERS[step.method][1] + extra))


# --- planning ------------------------------------------------------------------------------

def plan(model: nn.Module, recipe: Recipe) -> dict[str, tuple[Step, ...]]:
    """Resolve every linear layer to the (override-merged) steps that compress it, in recipe
    order (at most one pruning step, then at most one quantization step), and check everything
    that can fail before any work starts."""
    _, blocks = find_blocks(model)
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    out: dict[str, tuple[Step, ...]] = {}
    for name, mod in model.named_modules():
        if not _is_linear(mod) or isinstance(mod, CompressedLinear):
            continue
        hits = []
        for i, s in enumerate(recipe.steps):
            r = s.resolve(name, type(mod).__name__) or (
                s.resolve(name, "Linear") if type(mod).__name__ == "Conv1D" else None
            )
            if r is not None:
                hits.append((i, r))
        if not hits:
            continue
        kinds = [type(r).__name__ for _, r in hits]
        if len(hits) > 2 or len(set(kinds)) < len(kinds):
            raise RecipeError(f"{name} is targeted by steps {[i for i, _ in hits]}; a layer takes at most one "
                              "pruning step and one quantization step: add it to the others' ignore")
        if len(hits) == 2 and isinstance(hits[0][1], LowRankStep):
            q = hits[1][1]
            if not isinstance(q, QuantStep) or q.awq or q.smoothquant is not None or q.act_bits is not None:
                raise RecipeError(f"{name}: after a low-rank step a layer's two factors take plain weight "
                                  "quantization (rtn, gptq, hqq, nf4, fp4; no awq/smoothquant/activations), "
                                  "not pruning")
        if isinstance(hits[0][1], QuantStep) and len(hits) == 2:
            raise RecipeError(f"{name}: step {hits[1][0]} prunes after step {hits[0][0]} quantized; put the "
                              "pruning step first (quantization keeps the mask)")
        steps = tuple(r for _, r in hits)
        w = linear_weight(mod)
        for step in steps:
            if isinstance(step, PruneStep):
                try:
                    step.pattern_().check_shape(w.shape, name)
                except ValueError as e:
                    raise RecipeError(str(e)) from None
                if step.joint:
                    q = steps[-1] if isinstance(steps[-1], QuantStep) else None
                    if q is None or q.method != "gptq" or q.awq or q.act_bits is not None or q.type != "int":
                        raise RecipeError(f"{name}: joint sparsegpt needs a following plain 'gptq' step on the same "
                                          "layer (integer weights, no awq/activation quantization)")
            elif isinstance(step, LowRankStep):
                from llmpress.lowrank.svd import rank_for

                r = rank_for(w.shape, step.ratio)
                q = steps[-1]
                if isinstance(q, QuantStep) and q.method not in ("nf4", "fp4"):
                    for shape, part in (((r, w.shape[1]), "down"), ((w.shape[0], r), "up")):
                        try:
                            q.scheme().check_shape(shape, f"{name}.{part}")
                        except ValueError as e:
                            raise RecipeError(f"{e} (rank {r} factor of the low-rank step)") from None
                continue
            elif step.method not in ("nf4", "fp4") and not isinstance(steps[0], LowRankStep):
                # (code books flatten the weight: any shape fits; low-rank factors checked above)
                step.scheme().check_shape(w.shape, name)
            if needs(step) and id(mod) not in in_blocks:
                raise RecipeError(
                    f"{name} is outside the decoder blocks, where {step.describe()} has no "
                    "calibration statistics; ignore it or use a calibration-free method for it through an override"
                )
        if w.device.type != "meta" and not torch.isfinite(w.sum()) and not torch.isfinite(w).all():  # one cheap pass when finite
            raise ValueError(f"{name}: weight contains NaN or inf; refusing to compress a corrupted model")
        out[name] = steps
    if not out:
        raise RecipeError(f"recipe {recipe.name!r} matches no linear layer of {type(model).__name__}; check targets/ignore")
    return out


# --- several processes ---------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torch.distributed`` group that calibrates together: each
    rank runs the blocks on its share of the calibration samples, statistics are all-reduced,
    the solves of a block are spread over the ranks and their results broadcast."""

    rank: int = 0
    world: int = 1
    group: Any = None

    @classmethod
    def current(cls, group: Any = None) -> Dist:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's calibration samples (contiguous shares, the first ranks one larger)."""
        return torch.tensor_split(tokens, self.world)[self.rank] if self.active else tokens

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def _owners(units: list[list[str]], mods: dict[str, nn.Module], world: int) -> list[int]:
    """Rank solving each unit: largest first onto the least loaded rank; cost ~ K^2 (N + K)
    (GPTQ's trailing updates and its Cholesky factorisations)."""
    cost = []
    for names in units:
        n = sum(linear_weight(mods[ln]).shape[0] for ln in names)
        k = linear_weight(mods[names[0]]).shape[1]
        cost.append(k * k * (n + k))
    load = [0.0] * world
    owner = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: -cost[i]):
        r = min(range(world), key=lambda r: load[r])
        owner[i] = r
        load[r] += cost[i]
    return owner


def _broadcast_quantized(qw: QuantizedWeight | None, src: int, d: Dist, device: torch.device,
                         header: dict | None = None) -> tuple[QuantizedWeight, dict]:
    """``qw`` (and a small picklable ``header``) from rank ``src`` to every rank."""
    import torch.distributed as dist

    meta = [None]
    if d.rank == src:
        meta[0] = {"scheme": qw.scheme, "info": qw.info, "header": header,
                   "tensors": [(k, tuple(t.shape), t.dtype) for k, t in
                               (("qdata", qw.qdata), ("scale", qw.scale), ("zero", qw.zero)) if t is not None]}
    dist.broadcast_object_list(meta, src=src, group=d.group, device=device if device.type == "cuda" else None)
    m = meta[0]
    got = {}
    for k, shape, dtype in m["tensors"]:  # as raw bytes: every backend broadcasts uint8 (gloo has no int8)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if d.rank == src:
            u = getattr(qw, k).detach().contiguous().reshape(-1).view(torch.uint8).to(device)
        else:
            u = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dist.broadcast(u, src=src, group=d.group)
        got[k] = u.view(dtype).reshape(shape)
    if d.rank == src:
        return qw, m["header"]
    return QuantizedWeight(got["qdata"], got["scale"], got.get("zero"), m["scheme"], dict(m["info"])), m["header"]


# --- block input capture -------------------------------------------------------------------

class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for block ``i`` during capture: records what the model passes to it."""

    def __init__(self, i: int, last: bool, real: nn.Module, sink: list, first_out: list) -> None:
        super().__init__()
        self.i, self.last, self.sink, self.first_out = i, last, sink, first_out
        self.real = [real]  # hidden from nn.Module registration
        for k, v in vars(real).items():  # attributes the model loop may read (attention_type...)
            if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None))):
                setattr(self, k, v)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest, key = args[0], args[1:], None
        else:
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            hidden, rest = kwargs.pop(key), ()
        self.sink.append((hidden if self.i == 0 else None, rest, kwargs, key))
        if self.last:
            raise _StopForward
        if self.i == 0:  # learn the block's output structure once, from the real block
            real = self.real[0]
            real.to(hidden.device)
            out = real(hidden, *rest, **kwargs) if key is None else real(*rest, **{key: hidden}, **kwargs)
            self.first_out[:] = [out]
        out0 = self.first_out[0]
        return (hidden, *out0[1:]) if isinstance(out0, tuple) else hidden


def _capture(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int,
             device: torch.device) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Hidden states entering block 0 and, for every block, the other arguments the model
    passes to it (masks, position embeddings), per calibration batch."""
    n = len(blocks)
    real = list(blocks)
    sinks: list[list] = [[] for _ in range(n)]
    first_out: list = []
    home = next(model.parameters()).device
    for i in range(n):
        blocks[i] = _Recorder(i, i == n - 1, real[i], sinks[i], first_out)
    # The forward stops at the last block, so the output head never runs: keep it on the host.
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        model.set_output_embeddings(nn.Identity())
    try:
        model.to(device)  # what runs before block 0 (embeddings, rotary); blocks are recorders now
        with torch.inference_mode():
            for b in range(0, tokens.shape[0], batch_size):
                try:
                    model(input_ids=tokens[b : b + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        model.to(home)  # the blocks are recorders still: only what runs before them moves
        for i in range(n):
            blocks[i] = real[i]
        if head is not None:
            model.set_output_embeddings(head)
        for blk in real:
            if not _is_meta(blk):  # a streamed model's blocks are not loaded yet
                blk.to(home)
    inputs = [s[0] for s in sinks[0]]
    per_block = [[(rest, kw, key) for _, rest, kw, key in sinks[i]] for i in range(n)]
    return inputs, per_block


def _is_meta(m: nn.Module) -> bool:
    return any(t.is_meta for t in m.parameters())


def _run_block(block: nn.Module, x: torch.Tensor, call: tuple) -> torch.Tensor:
    rest, kw, key = call
    out = block(x, *rest, **kw) if key is None else block(*rest, **{key: x}, **kw)
    return out[0] if isinstance(out, tuple) else out


def rerun(block: nn.Module, inputs: list[torch.Tensor], calls: list[tuple], device: torch.device) -> None:
    """Replace ``inputs`` by the block's outputs (the next block's inputs), where they are kept."""
    with torch.inference_mode(), kernels.forced("reference"):
        for j, call in enumerate(calls):
            out = _run_block(block, inputs[j].to(device, non_blocking=True), call)
            if inputs[j].is_pinned() and out.shape == inputs[j].shape and out.dtype == inputs[j].dtype:
                inputs[j].copy_(out, non_blocking=True)  # back into its pinned host buffer, asynchronously
            else:
                inputs[j] = out.to(inputs[j].device)


ACTIVATIONS = ("auto", "gpu", "host")


def offload(inputs: list[torch.Tensor], device: torch.device, budget: float = 0.25, where: str = "auto") -> None:
    """Keep the calibration activations on the GPU when they take under ``budget`` of its free
    memory (``where="auto"``), otherwise on the host, moved in per batch: a 128 x 2048-token
    calibration set of an 8B model is 2 GB in bf16, of a 70B model 4 GB, of a 405B model 8 GB.
    ``where="host"`` / ``"gpu"`` force either."""
    if where not in ACTIVATIONS:
        raise ValueError(f"activations={where!r}; allowed: {ACTIVATIONS}")
    if device.type != "cuda" or not inputs or where == "gpu":
        return
    need = sum(x.numel() * x.element_size() for x in inputs)
    free, _ = torch.cuda.mem_get_info(device)
    if where == "host" or need > budget * (free + need):
        log.info("calibration activations (%.1f GB) kept on the host", need / 2**30)
        for j, x in enumerate(inputs):  # pinned: the copies to and from the GPU run asynchronously
            inputs[j] = x.cpu().pin_memory()
        torch.cuda.empty_cache()


@dataclass
class _BlockStats:
    """One block's statistics, shared by the linears that read the same tensor (q/k/v, gate/up:
    the first reader, ``owner``, holds them), the traced groups and the block's float output
    on the first batch."""

    shared: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)
    groups: list = field(default_factory=list)
    ref: torch.Tensor | None = None
    first_batch: Callable[[], torch.Tensor] | None = None

    def of(self, ln: str) -> dict[str, torch.Tensor]:
        return self.shared.get(self.owner.get(ln, ln), {})


def structure(block: nn.Module) -> tuple:
    """What a block's data flow between its linears depends on: its class and every submodule's
    name, class and weight shape. Blocks with equal structures share one trace."""
    return (type(block).__qualname__,) + tuple(
        (n, type(m).__name__, tuple(w.shape) if isinstance(w := getattr(m, "weight", None), torch.Tensor) else None)
        for n, m in block.named_modules())


def _block_stats(
    block: nn.Module, todo: dict[str, tuple[Step, ...]], mods: dict[str, nn.Module],
    inputs: list[torch.Tensor], calls: list[tuple], device: torch.device, dist_ctx: Dist | None = None,
    traces: dict | None = None,
) -> _BlockStats:
    """Run the block over the calibration inputs once with hooks and collect every statistic
    any step of the block's layers needs. A short trace on the first batch finds the linears
    sharing an input (one set of statistics each) and the op producing it (for scale folds);
    with ``traces`` (a dict kept across the blocks of one run) blocks of an already traced
    structure reuse its groups, and the float reference is the statistics pass's first output."""
    wanted = {ln: ss for ln, steps in todo.items() if (ss := tuple(x for st in steps for x in needs(st)))}
    if not wanted:
        return _BlockStats()

    def first_batch() -> torch.Tensor:  # the float reference for tracing and for checking folds
        return _run_block(block, inputs[0].to(device), calls[0])

    key = structure(block) if traces is not None else None
    if key is not None and key in traces:
        groups, ref = traces[key], None
    else:
        groups, ref = fold.trace(block, first_batch)
        if key is not None:
            traces[key] = groups
    owner = {ln: g.linears[0] for g in groups for ln in g.linears}  # first reader holds the stats
    per_owner: dict[str, set[str]] = defaultdict(set)
    for ln, ss in wanted.items():
        per_owner[owner.get(ln, ln)].update(ss)
    collectors: dict[str, dict] = {}
    hooks = []
    for own, ss in per_owner.items():
        k = linear_weight(mods[own]).shape[1]
        col = collectors[own] = {s: STATS[s](k, device) for s in sorted(ss)}
        def hook(m, a, o, col=col):
            for c in col.values():
                c.update(a[0])
        hooks.append(mods[own].register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for j, (x, call) in enumerate(zip(inputs, calls, strict=True)):
                out = _run_block(block, x.to(device, non_blocking=True), call)
                if j == 0 and ref is None:  # the same forward first_batch() runs (hooks only read)
                    ref = out
    finally:
        for h in hooks:
            h.remove()
    if dist_ctx is not None and dist_ctx.active:  # every rank saw its share of the samples
        for col in collectors.values():
            for c in col.values():
                c.all_reduce(dist_ctx.group)
    shared = {own: {s: c.result() for s, c in col.items()} for own, col in collectors.items()}
    return _BlockStats(shared, owner, groups, ref, first_batch)


def _fake_quant(step: QuantStep) -> Callable[[torch.Tensor], torch.Tensor]:
    scheme = step.scheme()

    def q(w: torch.Tensor) -> torch.Tensor:
        scale, zero = compute_qparams(w, scheme)
        return dequantize(quantize(w, scale, zero, scheme), scale, zero, scheme)

    return q


def _scale_block(block, todo, mods, groups, shared, scaled, ref, rerun, dist_ctx: Dist | None = None) -> dict[str, dict]:
    """AWQ / SmoothQuant scales for every group of linears whose step asks for them, folded
    into the op producing their input; the shared statistics are updated to what the scaled
    layers now see (x / s). A fold that changes the float block output is undone."""
    saved = fold.snapshot(block)
    saved_stats = {k: dict(v) for k, v in shared.items()}
    notes: dict[str, dict] = {}
    for g in groups:
        targets = [ln for ln in g.linears if ln in scaled]
        if not targets or not g.foldable:
            continue
        st = shared[g.linears[0]]
        ws = [linear_weight(mods[ln]).detach() for ln in targets]
        step = todo[targets[0]]
        if step.awq:
            s, alpha, info = search_scale(
                ws, [st["hessian"]] * len(targets), [_fake_quant(todo[ln]) for ln in targets],
                reduce_absmean(st["absmean"], g.rep, g.head_dim), rep=g.rep, head_dim=g.head_dim,
            )
        elif g.rep == 1:
            s, alpha, info = smooth_scale(
                ws, st["absmax"], step.smoothquant, st.get("xsample"),
                [_fake_quant(todo[ln]) for ln in targets], step.act_scheme(),
            )
        else:
            continue
        for ln in targets:
            notes[ln] = info
        if alpha == 0.0:
            continue
        fold.apply(block, g, s)
        se = expand_scale(s, g.rep, g.head_dim)
        new = dict(st)
        for k, v in st.items():
            se_ = se.to(v.device)
            if k == "hessian":
                new[k] = v / se_.unsqueeze(0) / se_.unsqueeze(1)
            else:  # absmean, absmax [K] and xsample [T, K] all divide by s per channel
                new[k] = v / se_
        shared[g.linears[0]] = new
    if notes:
        with torch.inference_mode():
            out = rerun()
            ok, rel = fold.same_output(ref, out, tol=1e-4 if out.dtype == torch.float32 else 3e-2)
        if dist_ctx is not None and dist_ctx.active:  # each rank checked its own batch: all must agree
            import torch.distributed as dist

            flag = torch.tensor([1 if ok else 0], device=out.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=dist_ctx.group)
            ok = bool(flag.item())
        if not ok:
            log.warning("scale folding changed the float output of a %s (rel. error %.2e); this block "
                        "keeps plain scales", type(block).__name__, rel)
            fold.restore(block, saved)
            shared.clear()
            shared.update(saved_stats)
            return {}
    return notes


# --- the pass ------------------------------------------------------------------------------

@dataclass
class CompressionReport:
    recipe: str
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    calib_tokens: int = 0
    device: str = "cpu"
    structure: list[dict] = field(default_factory=list)  # model-level edits (blocks removed)
    phases: dict[str, float] = field(default_factory=dict)  # seconds by phase (streaming)
    recovery: dict | None = None  # what a recipe's recover step did

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _block_index(name: str, prefix: str) -> int | None:
    """Index of the decoder block that module ``name`` lives in, or None."""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _swap(model: nn.Module, name: str, mod: nn.Module, qw: QuantizedWeight | CodebookWeight, home: torch.device,
          step: QuantStep | None = None, stats: dict | None = None) -> CompressedLinear:
    bias = getattr(mod, "bias", None)
    bias = None if bias is None else bias.detach().to(home)
    if isinstance(qw, CodebookWeight):
        new: CompressedLinear = CodebookLinear(qw.to(home), bias)
    elif isinstance(qw, LowRankWeight):
        new = LowRankLinear(qw.to(home), bias)
    else:
        act = step.act_scheme() if step is not None else None
        scale = None
        if act is not None and not act.dynamic:
            scale = static_scale(stats["absmax"].max(), act).to(home)
        new = QuantLinear(qw.to(home), bias, act, scale)
    set_submodule(model, name, new)
    return new


def _record(report: CompressionReport, name: str, step: Step, w: torch.Tensor, cw: Weight, desc: str,
            t0: float, method: str | None = None) -> None:
    deq = cw.dequantize(torch.float32)
    rel = float((deq - w.float()).norm() / w.float().norm().clamp(min=1e-12))
    if not math.isfinite(rel):  # w is finite (checked in plan): NaN/inf in deq shows here
        raise FloatingPointError(f"{name}: compressed weight is not finite")
    report.layers.append(dict(name=name, method=method or step.describe(), scheme=desc, rel_err=rel,
                              seconds=time.perf_counter() - t0, **cw.info))


def _compress_block(block: nn.Module, bp: str, todo: dict[str, tuple[Step, ...]], mods: dict[str, nn.Module],
                    bs: _BlockStats, device: torch.device, report: CompressionReport,
                    dist_ctx: Dist | None = None) -> None:
    """Pruning steps first (weights zeroed in place, masks kept), then scale folds (AWQ /
    SmoothQuant, checked against the pruned block's output), then quantization keeping the masks."""
    masks: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for ln, steps in todo.items():
        step = steps[0]
        if isinstance(step, LowRankStep):
            ts = time.perf_counter()
            w = linear_weight(mods[ln]).detach()
            st = dict(bs.of(ln))
            lw = SOLVERS[step.method][0](w, st, step, bp + ln)
            new = _swap(block, ln, mods[ln], lw, device)
            _record(report, bp + ln, step, w, lw, new.describe(), ts)
            done.add(ln)
            if len(steps) == 2:  # quantize both factors; the up factor sees x B^T: H_up = B H B^T
                q = steps[1]
                h = st.get("hessian")
                b = new.down.weight.detach().float()
                for part, hs in (("down", h), ("up", None if h is None else b @ h.to(b.device) @ b.T)):
                    ts = time.perf_counter()
                    sub = getattr(new, part)
                    fw = sub.weight.detach()
                    qw = SOLVERS[q.method][0](fw, {} if hs is None else {"hessian": hs}, q, f"{bp}{ln}.{part}")
                    ql = _swap(new, part, sub, qw, device, q)
                    _record(report, f"{bp}{ln}.{part}", q, fw, qw, ql.describe(), ts)
            continue
        if not isinstance(step, PruneStep):
            continue
        ts = time.perf_counter()
        mod = mods[ln]
        w = linear_weight(mod).detach()
        st = dict(bs.of(ln))
        if step.joint:
            st["joint"] = steps[1]
        cw = SOLVERS[step.method][0](w, st, step, bp + ln)
        if isinstance(cw, SparseWeight):
            cw.info.setdefault("sparsity", float(1 - cw.mask.float().mean()))
            _record(report, bp + ln, step, w, cw, cw.describe(), ts)
            with torch.no_grad():
                w.copy_(cw.weight.to(w.dtype))  # in place (a view of Conv1D's transposed weight)
            masks[ln] = cw.mask
        else:  # joint sparse + quantized solve: the quantization step is done too
            new = _swap(block, ln, mod, cw, device, steps[1])
            _record(report, bp + ln, step, w, cw, new.describe(), ts, f"{step.describe()}+{steps[1].describe()}")
            done.add(ln)
    quant = {ln: steps[-1] for ln, steps in todo.items() if isinstance(steps[-1], QuantStep) and ln not in done}
    extra: dict[str, dict] = {}
    scaled = {ln for ln, st in quant.items() if st.awq or st.smoothquant is not None}
    if scaled:
        ref = bs.ref
        if masks:  # folds must keep the pruned block's output
            with torch.inference_mode():
                ref = bs.first_batch()
        extra = _scale_block(block, quant, mods, bs.groups, bs.shared, scaled, ref, bs.first_batch, dist_ctx)
    units = _stacked(quant, bs, masks)
    spread = dist_ctx is not None and dist_ctx.active
    # with several ranks, integer solves are spread over them and broadcast (code books are
    # calibration-free and cheap: every rank computes them)
    owner = _owners(units, mods, dist_ctx.world) if spread else [0] * len(units)
    broadcast = [spread and quant[u[0]].method not in ("nf4", "fp4") for u in units]  # solved once, sent to all
    local = [not broadcast[i] or owner[i] == dist_ctx.rank for i in range(len(units))]
    solved: dict[int, list] = {}
    for i, names in enumerate(units):
        if not local[i]:
            continue
        ts = time.perf_counter()
        step = quant[names[0]]
        ws = [linear_weight(mods[ln]).detach() for ln in names]
        st = dict(bs.of(names[0]))
        if names[0] in masks:
            st["mask"] = masks[names[0]]
        qws = _split_rows(SOLVERS[step.method][0](torch.cat(ws) if len(ws) > 1 else ws[0], st, step,
                                                  bp + "+".join(names)), [w.shape[0] for w in ws])
        solved[i] = [(ln, w, qw, ts) for ln, w, qw in zip(names, ws, qws, strict=True)]
    for i, names in enumerate(units):
        step = quant[names[0]]
        st = dict(bs.of(names[0]))
        if not local[i]:  # solved on another rank: its weights and report rows arrive in order
            for ln in names:
                qw, rec = _broadcast_quantized(None, owner[i], dist_ctx, device)
                _swap(block, ln, mods[ln], qw, device, step, st)
                report.layers.append(rec)
            continue
        for ln, w, qw, ts in solved[i]:
            qw.info.update(extra.get(ln, {}))
            if len(names) > 1:
                qw.info["solved_with"] = [x for x in names if x != ln]
            if ln in masks:
                qw.info["sparsity"] = float((qw.dequantize(torch.float32) == 0).float().mean())
            new = _swap(block, ln, mods[ln], qw, device, step, st)
            _record(report, bp + ln, step, w, qw, new.describe(), ts)
            if broadcast[i]:
                report.layers[-1]["rank"] = dist_ctx.rank
                _broadcast_quantized(qw, owner[i], dist_ctx, device, header=report.layers[-1])


def _stacked(quant: dict[str, QuantStep], bs: _BlockStats, masks: dict) -> list[list[str]]:
    """Layers solved together: GPTQ layers reading the same input (one Hessian) with the same
    step stack their rows into one matrix (q/k/v, gate/up). GPTQ's rows are independent given
    H, so this is the same solve with a third or half the sequential column steps. Per-tensor
    scales couple the rows, and a pruned layer keeps its own mask: those go alone."""
    out: list[list[str]] = []
    where: dict[tuple, list[str]] = {}
    for ln, step in quant.items():
        key = (bs.owner.get(ln, ln), repr(step))
        stackable = step.method == "gptq" and ln not in masks and step.scheme().strategy != "tensor"
        if stackable and key in where:
            where[key].append(ln)
        else:
            out.append([ln])
            if stackable:
                where[key] = out[-1]
    return out


def _split_rows(qw: Weight, rows: list[int]) -> list[Weight]:
    """A stacked solve's result cut back into the layers' row ranges."""
    if len(rows) == 1:
        return [qw]
    assert isinstance(qw, QuantizedWeight) and qw.scheme.group_axis == 1 and qw.scheme.strategy != "tensor"
    out, a = [], 0
    for r in rows:
        out.append(QuantizedWeight(qw.qdata[a:a + r].clone(), qw.scale[a:a + r].clone(),
                                   None if qw.zero is None else qw.zero[a:a + r].clone(), qw.scheme, dict(qw.info)))
        a += r
    return out


def _owl(model: nn.Module, layers: dict[str, tuple[Step, ...]], tokens: torch.Tensor | None, batch_size: int,
         progress: bool, report: CompressionReport) -> dict[str, tuple[Step, ...]]:
    """Replace OWL pruning steps by per-block sparsities measured on the dense model."""
    import dataclasses

    from llmpress.prune.structured import owl_sparsities

    keys = {(st.sparsity, st.owl_lambda, st.owl_m) for ss in layers.values() for st in ss
            if isinstance(st, PruneStep) and st.owl}
    if not keys:
        return layers
    if tokens is None:
        raise ValueError("owl measures activation outliers on calibration data; pass calib=")
    prefix = find_blocks(model)[0] + "."
    per_key = {}
    for k in sorted(keys):
        ts = time.perf_counter()
        per_key[k] = owl_sparsities(model, tokens, *k, batch_size=batch_size, progress=progress)
        report.structure.append(dict(step=f"owl sparsity {k[0]:.0%} lambda {k[1]}", removed=[],
                                     block_sparsity=[round(x, 4) for x in per_key[k]],
                                     seconds=time.perf_counter() - ts))
    out = {}
    for name, ss in layers.items():
        i = _block_index(name, prefix)
        out[name] = tuple(
            dataclasses.replace(st, sparsity=per_key[(st.sparsity, st.owl_lambda, st.owl_m)][i], owl=False)
            if isinstance(st, PruneStep) and st.owl and i is not None else st for st in ss)
    return out


def run(
    model: nn.Module,
    recipe: Recipe,
    tokens: torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> CompressionReport:
    """Compress ``model`` in place following ``recipe``; ``tokens`` [n, seqlen] are the
    calibration samples (needed only when a planned method needs statistics)."""
    t0 = time.perf_counter()
    report = CompressionReport(recipe.name)
    shaping = [s for s in recipe.steps if isinstance(s, MODEL_STEPS)]
    per_layer = tuple(s for s in recipe.steps if not isinstance(s, MODEL_STEPS))
    layer_recipe = Recipe(per_layer, recipe.name) if per_layer else None
    if layer_recipe is not None and not shaping:
        plan(model, layer_recipe)  # fail on a bad recipe before any work
    for st in shaping:
        from llmpress.prune.structured import apply_model_step

        report.structure.append(apply_model_step(model, st, tokens, batch_size, progress))
    if layer_recipe is None:
        report.seconds = time.perf_counter() - t0
        report.peak_rss_mb = peak_rss_mb()
        return report
    recipe = layer_recipe
    layers = plan(model, recipe)
    layers = _owl(model, layers, tokens, batch_size, progress, report)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blocks_name, blocks = find_blocks(model)
    prefix = blocks_name + "." if blocks_name else ""
    by_block: dict[int | None, dict[str, tuple[Step, ...]]] = defaultdict(dict)  # None: outside blocks
    for n, s in layers.items():
        by_block[_block_index(n, prefix)][n] = s
    calib_methods = sorted({st.describe() for ss in layers.values() for st in ss if needs(st)})
    last_calib_block = max((i for i, ls in by_block.items() if i is not None
                            and any(needs(st) for ss in ls.values() for st in ss)), default=-1)
    report.device = str(device)

    inputs: list[torch.Tensor] = []
    calls: list[list[tuple]] = []
    if last_calib_block >= 0:
        if tokens is None:
            raise ValueError(f"recipe {recipe.name!r} needs calibration data ({calib_methods}); pass calib=")
        report.calib_tokens = int(tokens.numel())
        inputs, calls = _capture(model, blocks, tokens, batch_size, device)
        offload(inputs, device)

    bar = tqdm(range(len(blocks)), desc=f"compress {recipe.name}", unit="block", disable=not progress)
    traces: dict = {}
    for i in bar:
        block = blocks[i]
        bp = f"{prefix}{i}."
        todo = {n[len(bp):]: s for n, s in by_block.get(i, {}).items()}
        if not todo and i > last_calib_block:
            continue
        bar.set_postfix_str(f"{len(todo)} layers", refresh=False)
        block.to(device)
        mods = block_linears(block)
        bs = _block_stats(block, todo, mods, inputs, calls[i] if calls else [], device, traces=traces)
        _compress_block(block, bp, todo, mods, bs, device, report)
        bs.shared.clear()
        if i < last_calib_block:  # the next block sees this block's compressed outputs
            rerun(block, inputs, calls[i], device)
        block.to(home)
        release_memory()
    bar.close()

    for name, steps in by_block.get(None, {}).items():  # outside the blocks: calibration-free methods
        mod = model.get_submodule(name)
        if getattr(model.config, "tie_word_embeddings", False) and name == "lm_head":
            model.config.tie_word_embeddings = False  # the head gets its own (compressed) weight
            if isinstance(steps[0], PruneStep):  # pruning works in place: keep the embedding intact
                mod.weight = nn.Parameter(mod.weight.detach().clone(), requires_grad=False)
        _compress_block(model, "", {name: steps}, {name: mod}, _BlockStats(), home, report)

    report.seconds = time.perf_counter() - t0
    report.peak_rss_mb = peak_rss_mb()
    if device.type == "cuda":
        report.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
    log.info("compressed %d layers with %s in %.1fs", len(report.layers), recipe.name, report.seconds)
    return report


@torch.no_grad()
def input_moments(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean squared input of every column of every linear layer (the output head included) over
    the calibration ``tokens`` [n, seqlen]: what llama.cpp calls an importance matrix, the
    diagonal of each layer's Hessian. Keys are module names (``model.layers.0.mlp.down_proj``,
    ``lm_head``); values float32 [in_features] on the CPU."""
    stats: dict[str, Any] = {}
    hooks = []
    for name, mod in model.named_modules():
        if _is_linear(mod):
            def hook(m, args, name=name):
                x = args[0]
                if name not in stats:
                    stats[name] = STATS["sqnorm"](x.shape[-1], x.device)
                stats[name].update(x)
            hooks.append(mod.register_forward_pre_hook(hook))
    dev = next(model.parameters()).device
    try:
        for i in tqdm(range(0, tokens.shape[0], batch_size), desc="importance", unit="batch", disable=not progress):
            model(input_ids=tokens[i:i + batch_size].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: s.result().float().cpu() for n, s in stats.items()}
