"""The one calibration pass: capture block inputs, hook linears, collect statistics, call the
solvers, swap compressed modules in, re-run the block so the next block sees compressed inputs.

Every method goes through here; a method declares the statistics it needs in ``SOLVERS``.
Device placement lives here only: blocks move to ``device`` one at a time, so peak memory is
about one block, its statistics and the activations of one block boundary.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.models import _is_linear, block_linears, find_blocks, linear_weight, set_submodule
from llmpress.nn import QuantLinear
from llmpress.quant.gptq import gptq
from llmpress.quant.primitives import QuantizedWeight
from llmpress.quant.rtn import rtn
from llmpress.recipe import QuantStep, Recipe, RecipeError

log = logging.getLogger(__name__)


# --- dispatch: method -> (solver, statistics it needs) -------------------------------------

def _solve_rtn(w: torch.Tensor, stats: dict, step: QuantStep, name: str) -> QuantizedWeight:
    return rtn(w, step.scheme(), step.observer)


def _solve_gptq(w: torch.Tensor, stats: dict, step: QuantStep, name: str) -> QuantizedWeight:
    return gptq(w, stats["hessian"], step.scheme(), step.gptq_config(), name=name)


SOLVERS: dict[str, tuple[Callable[..., QuantizedWeight], tuple[str, ...]]] = {
    "rtn": (_solve_rtn, ()),
    "gptq": (_solve_gptq, ("hessian",)),
}


# --- statistics collected by forward hooks ------------------------------------------------

class _HessianStat:
    """Running ``H = 2/n sum x x^T`` over the rows of a linear layer's input."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [B, S, K] -> [B*S, K]
        m = x.shape[0]
        self.h.mul_(self.n / (self.n + m)).addmm_(x.t(), x, alpha=2.0 / (self.n + m))
        self.n += m

    def result(self) -> torch.Tensor:
        return self.h


STATS = {"hessian": _HessianStat}


# --- planning ------------------------------------------------------------------------------

def plan(model: nn.Module, recipe: Recipe) -> dict[str, QuantStep]:
    """Resolve every linear layer to the (override-merged) step that compresses it, and check
    everything that can fail before any work starts."""
    _, blocks = find_blocks(model)
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    out: dict[str, QuantStep] = {}
    for name, mod in model.named_modules():
        if not _is_linear(mod) or isinstance(mod, QuantLinear):
            continue
        hits = []
        for i, s in enumerate(recipe.steps):
            r = s.resolve(name, type(mod).__name__) or (
                s.resolve(name, "Linear") if type(mod).__name__ == "Conv1D" else None
            )
            if r is not None:
                hits.append((i, r))
        if len(hits) > 1:
            raise RecipeError(f"{name} is targeted by steps {[i for i, _ in hits]}; add it to all but one step's ignore")
        if not hits:
            continue
        step = hits[0][1]
        w = linear_weight(mod)
        step.scheme().check_shape(w.shape, name)
        if SOLVERS[step.method][1] and id(mod) not in in_blocks:
            raise RecipeError(
                f"{name} is outside the decoder blocks, where method {step.method!r} has no "
                "calibration statistics; ignore it or use method 'rtn' for it through an override"
            )
        if not torch.isfinite(w).all():
            raise ValueError(f"{name}: weight contains NaN or inf; refusing to compress a corrupted model")
        out[name] = step
    if not out:
        raise RecipeError(f"recipe {recipe.name!r} matches no linear layer of {type(model).__name__}; check targets/ignore")
    return out


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
        for i in range(n):
            blocks[i] = real[i]
        if head is not None:
            model.set_output_embeddings(head)
        model.to(home)
        for blk in real:
            blk.to(home)
    inputs = [s[0] for s in sinks[0]]
    per_block = [[(rest, kw, key) for _, rest, kw, key in sinks[i]] for i in range(n)]
    return inputs, per_block


def _run_block(block: nn.Module, x: torch.Tensor, call: tuple) -> torch.Tensor:
    rest, kw, key = call
    out = block(x, *rest, **kw) if key is None else block(*rest, **{key: x}, **kw)
    return out[0] if isinstance(out, tuple) else out


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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _block_index(name: str, prefix: str) -> int | None:
    """Index of the decoder block that module ``name`` lives in, or None."""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _swap(model: nn.Module, name: str, mod: nn.Module, qw: QuantizedWeight, home: torch.device) -> None:
    bias = getattr(mod, "bias", None)
    set_submodule(model, name, QuantLinear(qw.to(home), None if bias is None else bias.detach().to(home)))


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
    layers = plan(model, recipe)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blocks_name, blocks = find_blocks(model)
    prefix = blocks_name + "." if blocks_name else ""
    by_block: dict[int | None, dict[str, QuantStep]] = defaultdict(dict)  # None: outside blocks
    for n, s in layers.items():
        by_block[_block_index(n, prefix)][n] = s
    calib_methods = sorted({s.method for s in layers.values() if SOLVERS[s.method][1]})
    last_calib_block = max((i for i, ls in by_block.items() if i is not None
                            and any(SOLVERS[s.method][1] for s in ls.values())), default=-1)
    report = CompressionReport(recipe.name, device=str(device))

    inputs: list[torch.Tensor] = []
    calls: list[list[tuple]] = []
    if last_calib_block >= 0:
        if tokens is None:
            raise ValueError(f"recipe {recipe.name!r} needs calibration data (methods {calib_methods}); pass calib=")
        report.calib_tokens = int(tokens.numel())
        inputs, calls = _capture(model, blocks, tokens, batch_size, device)

    bar = tqdm(range(len(blocks)), desc=f"compress {recipe.name}", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i]
        bp = f"{prefix}{i}."
        todo = {n[len(bp):]: s for n, s in by_block.get(i, {}).items()}
        if not todo and i > last_calib_block:
            continue
        bar.set_postfix_str(f"{len(todo)} layers", refresh=False)
        block.to(device)
        mods = block_linears(block)
        stats: dict[str, dict] = {}
        hooks = []
        for ln, step in todo.items():
            for s in SOLVERS[step.method][1]:
                k = linear_weight(mods[ln]).shape[1]
                st = stats.setdefault(ln, {})[s] = STATS[s](k, device)
                hooks.append(mods[ln].register_forward_hook(lambda m, a, o, st=st: st.update(a[0])))
        try:
            if hooks:
                with torch.inference_mode():
                    for x, call in zip(inputs, calls[i], strict=True):
                        _run_block(block, x, call)
        finally:
            for h in hooks:
                h.remove()
        for ln, step in todo.items():
            ts = time.perf_counter()
            mod = mods[ln]
            w = linear_weight(mod).detach()
            st = {k: v.result() for k, v in stats.get(ln, {}).items()}
            qw = SOLVERS[step.method][0](w, st, step, bp + ln)
            deq = qw.dequantize(torch.float32)
            rel = float((deq - w.float()).norm() / w.float().norm().clamp(min=1e-12))
            if not torch.isfinite(deq).all():
                raise FloatingPointError(f"{bp + ln}: compressed weight is not finite")
            _swap(block, ln, mod, qw, device)
            report.layers.append(dict(name=bp + ln, method=step.method, scheme=step.scheme().describe(),
                                      rel_err=rel, seconds=time.perf_counter() - ts, **qw.info))
        stats.clear()
        if i < last_calib_block:  # the next block sees this block's compressed outputs
            with torch.inference_mode():
                for j, call in enumerate(calls[i]):
                    inputs[j] = _run_block(block, inputs[j], call)
        block.to(home)
    bar.close()

    for name, step in by_block.get(None, {}).items():  # outside the blocks: calibration-free methods
        mod = model.get_submodule(name)
        w = linear_weight(mod).detach()
        qw = SOLVERS[step.method][0](w, {}, step, name)
        _swap(model, name, mod, qw, home)
        report.layers.append(dict(name=name, method=step.method, scheme=step.scheme().describe(),
                                  rel_err=float((qw.dequantize() - w.float()).norm() / w.float().norm()), seconds=0.0))
        if getattr(model.config, "tie_word_embeddings", False) and name == "lm_head":
            model.config.tie_word_embeddings = False  # the head now has its own (quantized) weight

    report.seconds = time.perf_counter() - t0
    report.peak_rss_mb = peak_rss_mb()
    if device.type == "cuda":
        report.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
    log.info("compressed %d layers with %s in %.1fs", len(report.layers), recipe.name, report.seconds)
    return report
