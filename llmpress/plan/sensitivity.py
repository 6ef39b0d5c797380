"""Per-layer sensitivity: the KL(base || compressed) that compressing one unit of linear layers
alone, at each candidate setting, would add, estimated from one forward + backward pass.

A second-order estimate with the Kronecker-factored Fisher (K-FAC, Martens & Grosse 2015,
arXiv:1503.05671): for a linear ``y = W x`` and a weight change ``D``,

    KL ~= 1/2 sum_o G_o (D A D^T)_oo,   A = E[x x^T],  G_o = E[(d log p(y_hat) / d y_o)^2],

with ``y_hat`` sampled from the model's own predictions (so ``G`` is the true Fisher, not the
empirical one) and ``G`` kept diagonal. ``A`` is the statistic GPTQ uses (``H = 2 A``), so the
same pass feeds GPTQ candidates. Layers that read the same tensor (q/k/v, gate/up) form one
*unit*: serving engines fuse them, so they must share a format; the unit's cost is the sum.
Everything per candidate is a quantization solve and two matmuls: no extra forward passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmpress.models import _is_linear, find_blocks, linear_weight
from llmpress.plan.resources import _header
from llmpress.recipe import QuantStep, RecipeError
from llmpress.stats import STATS

log = logging.getLogger(__name__)


@dataclass
class Option:
    """One candidate setting of a unit: its storage and predicted KL (nats per token)."""

    bits: int
    group_size: int
    nbytes: int
    kl: float
    kl_kfac: float | None = None  # the second-order estimate, kept when ``kl`` was measured directly


@dataclass
class Unit:
    """Linear layers that must share a format (they read the same input), in one block."""

    names: tuple[str, ...]
    block: int | None
    params: int
    options: list[Option] = field(default_factory=list)
    overhead: int = 0  # checkpoint bytes besides the options' (shape tensors, header entries)


@dataclass
class Sensitivity:
    """Measured per-unit costs, plus what the plan needs to turn them into a recipe."""

    model: str
    step: dict  # the QuantStep the candidates vary (method, symmetric, observer...)
    units: list[Unit]
    fixed_bytes: int  # everything in the checkpoint that the plan does not choose
    dense_bytes: int  # the planned layers unquantized, as saved
    tokens: int
    seconds: float
    meta: dict = field(default_factory=dict)
    # measured at an operating point: the options' ``kl`` are changes from this KL (of every unit
    # at the operating point's setting), so a plan's KL is this plus the sum of its options'
    kl_offset: float = 0.0

    def base_step(self) -> QuantStep:
        return QuantStep(**{k: (tuple(v) if k in ("targets", "ignore", "overrides") else v)
                            for k, v in self.step.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        try:
            d = json.loads(Path(path).read_text())
            d["units"] = [Unit(tuple(u["names"]), u["block"], u["params"], [Option(**o) for o in u["options"]],
                               u.get("overhead", 0)) for u in d["units"]]
            return cls(**d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a sensitivity file written by `llmpress plan --save-sensitivity` ({e})") from None


def candidates(step: QuantStep, bits: Sequence[int], group_sizes: Sequence[int]) -> list[QuantStep]:
    """The candidate steps: ``step`` with every (bits, group_size) pair."""
    out = []
    for b in bits:
        for g in group_sizes:
            try:
                out.append(dataclasses.replace(step, bits=int(b), group_size=int(g), strategy=None, overrides=()))
            except RecipeError as e:
                raise RecipeError(f"candidate bits={b} group_size={g}: {e}") from None
    return out


def _targets(model: nn.Module, step: QuantStep) -> dict[str, nn.Module]:
    """The linears inside the decoder blocks that ``step`` targets (the planned layers)."""
    _, blocks = find_blocks(model)
    inside = {id(m) for b in blocks for m in b.modules()}
    return {n: m for n, m in model.named_modules()
            if _is_linear(m) and id(m) in inside and (step.resolve(n, type(m).__name__) or step.resolve(n, "Linear"))}


def _fisher_pass(model: nn.Module, mods: dict[str, nn.Module], tokens: torch.Tensor, batch_size: int,
                 seed: int, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str], int]:
    """One forward + backward per batch. Returns H = 2 E[x x^T] per input owner, G (the Fisher
    diagonal of each layer's output), the owner of each layer's input, and the token count."""
    device = next(model.parameters()).device
    owner: dict[str, str] = {}
    hess: dict[str, Any] = {}
    fisher: dict[str, torch.Tensor] = {}
    # input tensors of the current block -> first reader; the tensors are held so that a freed
    # input's memory cannot be reused by a later input of the same block and look shared
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}
    block_of = {n: n.rsplit(".", 2)[0] for n in mods}
    cur = [""]
    hooks = []

    def fwd(m, a, o, name):
        x = a[0]
        if name not in owner:
            if block_of[name] != cur[0]:
                seen.clear()
                cur[0] = block_of[name]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            owner[name] = seen.setdefault(key, (name, x))[0]
        own = owner[name]
        if own == name:
            if own not in hess:
                hess[own] = STATS["hessian"](x.shape[-1], x.device)
            hess[own].update(x.detach())
        if o.requires_grad:
            def grad_hook(g, name=name):
                g2 = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)  # [B, S, N] -> [N]
                fisher[name] = fisher[name] + g2 if name in fisher else g2
            o.register_hook(grad_hook)

    for n, m in mods.items():
        hooks.append(m.register_forward_hook(lambda m, a, o, n=n: fwd(m, a, o, n)))
    emb = model.get_input_embeddings()
    hooks.append(emb.register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_tok = 0
    was_training = model.training
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients flow to the activations only: no weight gradients are made
        p.requires_grad_(False)
    try:
        for b in tqdm(range(0, tokens.shape[0], batch_size), desc="sensitivity: fisher pass", unit="batch",
                      disable=not progress):
            seen.clear()
            cur[0] = ""
            ids = tokens[b : b + batch_size].to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits.float()  # [B, S, V]
                logp = F.log_softmax(logits, dim=-1)
                with torch.no_grad():  # labels drawn from the model itself: the true Fisher
                    y = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]).cpu(), 1, generator=gen)
                loss = -logp.reshape(-1, logp.shape[-1]).gather(1, y.to(device)).sum()
                loss.backward()
            n_tok += ids.numel()
            del logits, logp, loss
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)
    missing = [n for n in mods if n not in fisher]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:3]}: the sensitivity pass needs them on the loss path")
    return ({k: v.result() for k, v in hess.items()}, {k: v / n_tok for k, v in fisher.items()}, owner, n_tok)


@torch.no_grad()
def _hessians(model: nn.Module, mods: dict[str, nn.Module], owner: dict[str, str], tokens: torch.Tensor,
              batch_size: int, progress: bool) -> dict[str, torch.Tensor]:
    """H = 2 E[x x^T] of every input owner over ``tokens`` (forward only, no output head)."""
    from llmpress.prune.structured import _forward_all

    hess: dict[str, Any] = {}
    hooks = []
    for own in set(owner.values()):
        def hook(m, a, o, own=own):
            x = a[0]
            if own not in hess:
                hess[own] = STATS["hessian"](x.shape[-1], x.device)
            hess[own].update(x)
        hooks.append(mods[own].register_forward_hook(hook))
    _forward_all(model, tokens, batch_size * 4, hooks, "sensitivity: fit statistics", progress)
    return {k: v.result() for k, v in hess.items()}


def _solve(w: torch.Tensor, h: torch.Tensor, step: QuantStep, name: str):
    from llmpress.calibrate import SOLVERS

    return SOLVERS[step.method][0](w, {"hessian": h}, step, name)


def _final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block and the output head (Llama, Qwen2, Gemma, Mistral,
    Phi-3: ``norm``; GPT-NeoX: ``final_layer_norm``; Falcon / GPT-2: ``ln_f``)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    for holder in (dec, getattr(model, "model", None), getattr(model, "transformer", None), getattr(model, "gpt_neox", None)):
        for attr in ("norm", "final_layer_norm", "final_layernorm", "ln_f"):
            m = getattr(holder, attr, None) if holder is not None else None
            if isinstance(m, nn.Module):
                return m
    raise RecipeError(f"{type(model).__name__}: no final norm found; direct sensitivity measurement needs one "
                      "(plan without --direct-samples)")


class _Direct:
    """KL(base || model) of the whole model's output on a few calibration samples when one unit's
    weights change: the float model's hidden states entering every block are kept, so a
    candidate costs the forward of the blocks from its own to the last, plus the output head."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int,
                 context: dict[nn.Module, torch.Tensor] | None = None) -> None:
        from llmpress.calibrate import _capture, _run_block

        self.run_block = _run_block
        _, self.blocks = find_blocks(model)
        dev = next(model.parameters()).device
        inputs, self.calls = _capture(model, self.blocks, tokens, batch_size, dev)
        self.norm, self.head = _final_norm(model), model.get_output_embeddings()
        self.n = sum(h.shape[0] * h.shape[1] for h in inputs)
        self.context = context or {}
        self.block_of = {id(m): i for i, b in enumerate(self.blocks) for m in b.modules()}
        with torch.inference_mode():
            states = self._states(inputs)
            self.base = [self._logp(h) for h in states[-1]]
            if self.context:
                with self._swapped(self.context):
                    states = self._states(inputs)
                    self.kl0 = self._kl(states[-1])
            else:
                self.kl0 = 0.0
        self.states = states[:-1]  # the last block's outputs are only needed for the distributions

    def _states(self, inputs: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        states = [list(inputs)]
        for i, blk in enumerate(self.blocks):
            states.append([self.run_block(blk, x, c) for x, c in zip(states[-1], self.calls[i])])
        return states

    @contextlib.contextmanager
    def _swapped(self, weights: dict[nn.Module, torch.Tensor]):
        saved = {m: linear_weight(m).detach().clone() for m in weights}
        try:
            for m, w in weights.items():
                linear_weight(m).data.copy_(w)
            yield
        finally:
            for m, w in saved.items():
                linear_weight(m).data.copy_(w)

    def _kl(self, outs: Sequence[torch.Tensor]) -> float:
        total = 0.0
        for b, h in zip(self.base, outs):
            total += float((b.exp() * (b - self._logp(h))).sum())
        return total / self.n

    def _logp(self, h: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.head(self.norm(h)).float(), dim=-1)

    @torch.inference_mode()
    def kl(self, block: int, weights: dict[nn.Module, torch.Tensor]) -> float:
        """KL(float || model) with ``weights`` in place; the rest at the context's weights (if
        any, measured from the context model's hidden states entering ``block``) or float."""
        later = {m: w for m, w in self.context.items() if self.block_of.get(id(m), -1) >= block}
        with self._swapped({**later, **weights}):
            outs = []
            for j, h in enumerate(self.states[block]):
                for i in range(block, len(self.blocks)):
                    h = self.run_block(self.blocks[i], h, self.calls[i][j])
                outs.append(h)
            return self._kl(outs)


def kfac_kl(delta: torch.Tensor, h: torch.Tensor, g: torch.Tensor) -> float:
    """1/2 sum_o g_o (D A D^T)_oo with A = H / 2: the predicted KL of a weight change ``delta``."""
    d = delta.float()
    return 0.25 * float((g * ((d @ h) * d).sum(1)).sum())


@torch.no_grad()
def measure(
    model: nn.Module,
    tokens: torch.Tensor,
    step: QuantStep,
    bits: Sequence[int] = (2, 3, 4, 8),
    group_sizes: Sequence[int] = (32, 64, 128),
    *,
    batch_size: int = 2,
    seed: int = 0,
    progress: bool = True,
    name: str = "model",
    fit_tokens: torch.Tensor | None = None,
    direct_tokens: torch.Tensor | None = None,
    direct_max_bits: int = 4,
    direct_base: tuple[int, int] | float | None = None,
) -> Sensitivity:
    """Measure every planned unit's predicted KL and storage at every candidate setting.

    With ``fit_tokens`` (other calibration samples), the solvers fit on their statistics and
    the error is scored on ``tokens``'; otherwise both use ``tokens`` (a solver like GPTQ then
    looks better on the data it fitted than on new data).

    ``step`` fixes the method and everything but bits and group size (e.g. the ``w4a16-gptq``
    preset's step). Candidates whose group size does not divide a unit's input width are left
    out for that unit (one entry in the log per shape); a unit with no valid candidate is an error.

    With ``direct_tokens`` (a few calibration samples), every candidate of at most
    ``direct_max_bits`` bits is instead measured: the unit alone is replaced by that candidate's
    solved weights and the model's output KL to the float model is computed on those samples
    (the K-FAC value stays in ``Option.kl_kfac``). On smollm2-135m the K-FAC estimate was off by
    0.04x to 3.6x per unit (massive-activation inputs, attention output projections); the cost is
    one forward of the blocks after the unit per candidate.

    With ``direct_base`` too (a candidate ``(bits, group_size)``, or a number of bits: the
    candidate whose uniform allocation is nearest that average), every candidate is measured at
    that *operating point*: all other units hold the operating point's solved weights, and the
    option's ``kl`` is the change from the KL of the operating point itself (kept in
    ``Sensitivity.kl_offset``; an option can be negative). Costs measured from the float model
    add up badly when many units move at once (on smollm2-135m a 3-bit plan's joint KL was 1.4x
    the sum of its units' costs); around a nearby operating point the errors a unit meets are
    the ones the plan will have.
    """
    from llmpress.eval.ppl import model_size

    t0 = time.perf_counter()
    if step.act_bits is not None or step.awq or step.smoothquant is not None or step.method in ("nf4", "fp4"):
        raise RecipeError("plan varies bits and group size of weight-only rtn / gptq / hqq steps; "
                          f"got {step.describe()}")
    cands = candidates(step, bits, group_sizes)
    mods = _targets(model, step)
    if not mods:
        raise RecipeError(f"the step targets no linear layer inside the decoder blocks of {type(model).__name__}")
    for n, m in mods.items():
        if not torch.isfinite(linear_weight(m)).all():
            raise ValueError(f"{n}: weight contains NaN or inf; refusing to plan a corrupted model")
    hess, fisher, owner, n_tok = _fisher_pass(model, mods, tokens, batch_size, seed, progress)
    fit = hess if fit_tokens is None else _hessians(model, mods, owner, fit_tokens, batch_size, progress)
    prefix = find_blocks(model)[0] + "."
    groups: dict[str, list[str]] = {}
    for n in mods:
        groups.setdefault(owner[n], []).append(n)
    base_c, context, base_q = None, {}, {}
    if direct_base is not None:
        if direct_tokens is None:
            raise ValueError("direct_base needs direct_tokens (the samples the operating point is measured on)")
        base_c = _operating_point(mods, cands, direct_base)
        for own, names in tqdm(list(groups.items()), desc=f"operating point w{base_c.bits} g{base_c.group_size}",
                               unit="unit", disable=not progress):
            for n in names:
                w = linear_weight(mods[n]).detach()
                base_q[n] = _solve(w, fit[own], base_c, n)
                context[mods[n]] = base_q[n].dequantize(torch.float32).to(w.dtype)
    direct = _Direct(model, direct_tokens, batch_size, context) if direct_tokens is not None else None
    if base_c is not None:
        log.info("operating point w%d g%d: KL %.4f nats/token", base_c.bits, base_c.group_size, direct.kl0)
    units = []
    skipped: set[tuple] = set()
    total = sum(len(v) for v in groups.values()) * len(cands)
    bar = tqdm(total=total, desc=f"sensitivity: {len(cands)} candidates", unit="solve", disable=not progress)
    for own, names in groups.items():
        rest = own[len(prefix):] if own.startswith(prefix) else ""
        blk = int(rest.split(".", 1)[0]) if rest.split(".", 1)[0].isdigit() else None
        ws = {n: linear_weight(mods[n]).detach() for n in names}
        u = Unit(tuple(names), blk, sum(w.numel() for w in ws.values()))
        h, hf = hess[own], fit[own]
        for c in cands:
            try:
                for w in ws.values():
                    c.scheme().check_shape(w.shape, own)
            except ValueError:
                skipped.add((c.group_size, tuple(ws[names[0]].shape)))
                bar.update(len(names))
                continue
            kl, nbytes = 0.0, 0
            solved = {}
            is_base = base_c is not None and (c.bits, c.group_size) == (base_c.bits, base_c.group_size)
            for n, w in ws.items():
                qw = base_q[n] if is_base else _solve(w, hf, c, n)
                wq = qw.dequantize(torch.float32)
                kl += kfac_kl(wq - w.float(), h, fisher[n].to(h.device))
                nbytes += math.ceil(qw.storage_bits() / 8)  # packed codes, scales, zero points
                if direct is not None and (base_c is not None or c.bits <= direct_max_bits):
                    solved[mods[n]] = wq.to(w.dtype)
                bar.update(1)
            # the shape tensor and the header entries of each layer's tensors
            u.overhead = sum(16 + _header(n, 3 + (not c.symmetric)) for n in names)
            if solved and blk is not None:
                if base_c is None:
                    d = max(direct.kl(blk, solved), 0.0)
                else:  # the change from the operating point (zero at the operating point itself)
                    d = 0.0 if is_base else direct.kl(blk, solved) - direct.kl0
                u.options.append(Option(c.bits, c.group_size, nbytes, d, kl))
            else:
                u.options.append(Option(c.bits, c.group_size, nbytes, kl))
        if not u.options:
            raise RecipeError(f"{', '.join(names)}: no candidate group size in {list(group_sizes)} divides "
                              f"in_features={ws[names[0]].shape[1]}; add a divisor (or -1, per channel) to the group sizes")
        units.append(u)
    bar.close()
    for g, shape in sorted(skipped, key=str):
        log.info("group_size %s does not divide %s: left out for those layers", g, list(shape))
    size_mb, _, _ = model_size(model)
    dense = sum(linear_weight(m).numel() * linear_weight(m).element_size() for m in mods.values())
    n_tensors = len(model.state_dict()) - len(mods)  # tensors kept as they are (shared ones counted once is close)
    fixed = int(size_mb * 1e6) - dense + _header("model.layers.0.input_layernorm.weight", n_tensors)
    d = step.to_dict()
    d["overrides"] = []
    return Sensitivity(name, d, units, fixed, dense, n_tok, time.perf_counter() - t0,
                       dict(bits=list(bits), group_sizes=list(group_sizes), seed=seed,
                            direct_tokens=0 if direct is None else direct.n, direct_max_bits=direct_max_bits,
                            direct_base=None if base_c is None else [base_c.bits, base_c.group_size]),
                       kl_offset=0.0 if base_c is None else direct.kl0)


def _operating_point(mods: dict[str, nn.Module], cands: list[QuantStep], base: tuple[int, int] | float) -> QuantStep:
    """The candidate ``base`` names, or (a number) the one whose uniform allocation's average bits
    per weight, scales included, is nearest it; it must fit every planned layer."""
    from llmpress.quant.rtn import rtn

    def fits(c: QuantStep) -> bool:
        try:
            for m in mods.values():
                c.scheme().check_shape(linear_weight(m).shape)
            return True
        except ValueError:
            return False

    ok = [c for c in cands if fits(c)]
    if isinstance(base, tuple):
        hit = [c for c in ok if (c.bits, c.group_size) == tuple(base)]
        if not hit:
            raise RecipeError(f"operating point w{base[0]} g{base[1]} is not a candidate that fits every planned layer; "
                              f"those are {[(c.bits, c.group_size) for c in ok]}")
        return hit[0]
    if not ok:
        raise RecipeError("no candidate fits every planned layer, so none can be the operating point; "
                          "add -1 (per channel) to the group sizes")
    n = sum(linear_weight(m).numel() for m in mods.values())

    def avg_bits(c: QuantStep) -> float:
        return sum(rtn(linear_weight(m).detach(), c.scheme()).storage_bits() for m in mods.values()) / n

    return min(ok, key=lambda c: (abs(avg_bits(c) - float(base)), c.bits, c.group_size))
