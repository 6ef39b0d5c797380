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

import copy
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
    symmetric: bool | None = None  # None: the planned step's (files written before zero points were planned)

    def sym(self, default: bool) -> bool:
        return default if self.symmetric is None else self.symmetric

    def label(self, default: bool) -> str:
        """'3/-1', or '2/64a' for an asymmetric option of a symmetric step (and 's' the other way)."""
        mark = "" if self.sym(default) == default else ("s" if self.sym(default) else "a")
        return f"{self.bits}/{self.group_size}{mark}"


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

    @property
    def symmetric(self) -> bool:
        """The planned step's symmetry (what an option without its own stands for)."""
        return bool(self.step.get("symmetric", True))

    def merge(self, other: Sensitivity) -> Sensitivity:
        """These costs plus ``other``'s options that are not here (same model, units and tokens:
        e.g. asymmetric candidates measured later on the same calibration samples)."""
        if [u.names for u in self.units] != [u.names for u in other.units] or self.tokens != other.tokens:
            raise ValueError("can only merge sensitivities of the same units measured on the same tokens")
        if self.meta.get("direct_tokens", 0) != other.meta.get("direct_tokens", 0):
            raise ValueError("can only merge sensitivities measured the same way (direct tokens differ)")
        out = copy.deepcopy(self)
        for u, v in zip(out.units, other.units):
            have = {(o.bits, o.group_size, o.sym(self.symmetric)) for o in u.options}
            for o in v.options:
                key = (o.bits, o.group_size, o.sym(other.symmetric))
                if key not in have:
                    u.options.append(dataclasses.replace(o, symmetric=key[2]))
                    have.add(key)
        out.seconds += other.seconds
        return out

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


def candidates(step: QuantStep, bits: Sequence[int], group_sizes: Sequence[int],
               asym_bits: Sequence[int] = ()) -> list[QuantStep]:
    """The candidate steps: ``step`` with every (bits, group_size) pair, and for a symmetric
    step also its asymmetric form (an integer zero point per group) at the ``asym_bits`` widths."""
    out = []
    for b in bits:
        for g in group_sizes:
            for sym in (step.symmetric, False) if step.symmetric and int(b) in set(asym_bits) else (step.symmetric,):
                try:
                    out.append(dataclasses.replace(step, bits=int(b), group_size=int(g), symmetric=sym, strategy=None,
                                                   overrides=()))
                except RecipeError as e:
                    raise RecipeError(f"candidate bits={b} group_size={g} symmetric={sym}: {e}") from None
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

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int) -> None:
        from llmpress.calibrate import _capture, _run_block

        self.run_block = _run_block
        _, self.blocks = find_blocks(model)
        dev = next(model.parameters()).device
        inputs, self.calls = _capture(model, self.blocks, tokens, batch_size, dev)
        self.states = [list(inputs)]
        with torch.inference_mode():
            for i, blk in enumerate(self.blocks):
                self.states.append([_run_block(blk, x, c) for x, c in zip(self.states[-1], self.calls[i])])
        self.norm, self.head = _final_norm(model), model.get_output_embeddings()
        self.base = [self._logp(h) for h in self.states[-1]]
        self.states.pop()  # the last block's outputs are only needed for the base distribution
        self.n = sum(h.shape[0] * h.shape[1] for h in inputs)

    def _logp(self, h: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.head(self.norm(h)).float(), dim=-1)

    @torch.inference_mode()
    def kl(self, block: int, weights: dict[nn.Module, torch.Tensor]) -> float:
        saved = {m: linear_weight(m).detach().clone() for m in weights}
        try:
            for m, w in weights.items():
                linear_weight(m).data.copy_(w)
            total = 0.0
            for j, h in enumerate(self.states[block]):
                for i in range(block, len(self.blocks)):
                    h = self.run_block(self.blocks[i], h, self.calls[i][j])
                b = self.base[j]
                total += float((b.exp() * (b - self._logp(h))).sum())
            return total / self.n
        finally:
            for m, w in saved.items():
                linear_weight(m).data.copy_(w)


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
    asym_bits: Sequence[int] = (),
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

    ``asym_bits``: bit widths at which a symmetric step's asymmetric form is a candidate too (at
    2 bits a zero point lets the grid sit where the weights are; it costs one code per group).
    """
    from llmpress.eval.ppl import model_size

    t0 = time.perf_counter()
    if step.act_bits is not None or step.awq or step.smoothquant is not None or step.method in ("nf4", "fp4"):
        raise RecipeError("plan varies bits and group size of weight-only rtn / gptq / hqq steps; "
                          f"got {step.describe()}")
    cands = candidates(step, bits, group_sizes, asym_bits)
    mods = _targets(model, step)
    if not mods:
        raise RecipeError(f"the step targets no linear layer inside the decoder blocks of {type(model).__name__}")
    for n, m in mods.items():
        if not torch.isfinite(linear_weight(m)).all():
            raise ValueError(f"{n}: weight contains NaN or inf; refusing to plan a corrupted model")
    hess, fisher, owner, n_tok = _fisher_pass(model, mods, tokens, batch_size, seed, progress)
    fit = hess if fit_tokens is None else _hessians(model, mods, owner, fit_tokens, batch_size, progress)
    direct = _Direct(model, direct_tokens, batch_size) if direct_tokens is not None else None
    prefix = find_blocks(model)[0] + "."
    groups: dict[str, list[str]] = {}
    for n in mods:
        groups.setdefault(owner[n], []).append(n)
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
            for n, w in ws.items():
                qw = _solve(w, hf, c, n)
                wq = qw.dequantize(torch.float32)
                kl += kfac_kl(wq - w.float(), h, fisher[n].to(h.device))
                nbytes += math.ceil(qw.storage_bits() / 8)  # packed codes, scales, zero points
                if direct is not None and c.bits <= direct_max_bits:
                    solved[mods[n]] = wq.to(w.dtype)
                bar.update(1)
            # the shape tensor and the header entries of each layer's tensors
            u.overhead = sum(16 + _header(n, 3 + (not c.symmetric)) for n in names)
            if solved and blk is not None:
                u.options.append(Option(c.bits, c.group_size, nbytes, max(direct.kl(blk, solved), 0.0), kl, c.symmetric))
            else:
                u.options.append(Option(c.bits, c.group_size, nbytes, kl, symmetric=c.symmetric))
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
                            asym_bits=list(asym_bits)))
