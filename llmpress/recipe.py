"""Recipes: an ordered list of steps, each a frozen, validated config.

YAML/JSON form::

    name: my-w4
    steps:
      - method: gptq          # rtn | gptq | hqq | nf4 | fp4 | awq (= rtn with awq: true)
        awq: false            # AWQ scales folded into the previous op before rtn/gptq
        bits: 4
        group_size: 64        # -1 = one scale per output channel
        symmetric: true
        targets: [Linear]     # class names, exact module names, or "re:<regex>"
        ignore: [lm_head]
        overrides:            # first match wins; any step field but targets/ignore/overrides
          - pattern: "re:.*down_proj"
            bits: 8
          - pattern: "re:model\\.layers\\.0\\..*"
            skip: true
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmpress.quant.act import ActScheme
from llmpress.quant.gptq import GPTQConfig
from llmpress.quant.primitives import OBSERVERS, STRATEGIES, QuantScheme

METHODS = ("rtn", "gptq", "hqq", "nf4", "fp4")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
LOWRANK_METHODS = ("svd", "asvd")
ALIASES = {"awq": dict(method="rtn", awq=True)}  # shorthand method names


class RecipeError(ValueError):
    """A recipe field has a bad value; the message names the field and what is allowed."""


def match(target: str, name: str, cls_name: str) -> bool:
    """compressed-tensors' target semantics: ``re:`` regex (re.match), exact name, or class."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == cls_name


class _Targeted:
    """What every step shares: which modules it applies to, and per-module overrides."""

    def with_override(self, o: dict) -> Any:
        kw = {k: v for k, v in o.items() if k not in ("pattern", "skip")}
        if "group_size" in kw and "strategy" not in kw:
            kw["strategy"] = None
        return dataclasses.replace(self, overrides=(), **kw)

    def resolve(self, name: str, cls_name: str = "Linear") -> Any | None:
        """The effective settings for module ``name``, or None if this step leaves it alone."""
        if not any(match(t, name, cls_name) for t in self.targets):
            return None
        if any(match(t, name, cls_name) for t in self.ignore):
            return None
        for o in self.overrides:
            if match(o["pattern"], name, cls_name):
                return None if o.get("skip") else self.with_override(o)
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # YAML / JSON lists


def _check_targets(step: Any) -> None:
    for f in ("targets", "ignore", "overrides"):
        v = getattr(step, f)
        if isinstance(v, (str, dict)) or not isinstance(v, (list, tuple)):
            raise RecipeError(f"{f} must be a list, got {type(v).__name__}: {v!r}")
        object.__setattr__(step, f, tuple(v))
    if not step.targets:
        raise RecipeError("targets must name at least one module pattern (e.g. [Linear])")
    for bad in [t for t in step.targets + step.ignore if not isinstance(t, str)]:
        raise RecipeError(f"targets/ignore entries must be strings, got {bad!r}")
    for t in step.targets + step.ignore:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise RecipeError(f"bad regex {t!r} in targets/ignore: {e}") from None
    for o in step.overrides:
        if not isinstance(o, dict) or "pattern" not in o:
            raise RecipeError(f"each override needs a 'pattern' key, got {o!r}")
        allowed = {"pattern", "skip"} | (_fields(step) - {"targets", "ignore", "overrides"})
        extra = set(o) - allowed
        if extra:
            raise RecipeError(f"override {o['pattern']!r}: unknown field(s) {sorted(extra)}; allowed: {sorted(allowed)}")
        if not o.get("skip"):
            step.with_override(o)  # validates the merged values


@dataclass(frozen=True)
class QuantStep(_Targeted):
    """Weight-only integer quantization of the targeted linear layers."""

    method: str = "gptq"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    strategy: str | None = None  # derived from group_size when None
    group_axis: int = 1  # 1: groups along in_features; 0: along out_features (rtn/hqq; llmpress checkpoints only)
    observer: str = "minmax"  # minmax | mse (clipping search; importance-weighted in GPTQ)
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[dict, ...] = ()
    awq: bool = False  # activation-aware scales (AWQ) folded into the previous op first
    float_zero: bool = False  # hqq: keep the optimised zero point in float (llmpress-only checkpoints)
    # hqq: ranges tried per group, as fractions of the min-max range: each group starts from the one
    # whose plain rounding fits it best, then HQQ optimises the zero point. Clipping matters most at
    # 2 bits, where w2a16-hqq also tries 0.8.
    range_shrink: tuple[float, ...] = (1.0,)
    type: str = "int"  # weight grid: int | float (FP8 E4M3, 8 bits, symmetric)
    # activation quantization (W8A8): 8-bit int or float, per token (dynamic) or per tensor (static)
    act_bits: int | None = None
    act_type: str = "int"
    act_strategy: str = "token"
    act_dynamic: bool = True
    smoothquant: float | str | None = None  # migration strength alpha in [0, 1], or "auto" (searched)
    double_quant: bool = True  # nf4/fp4: quantize the absmax values too (bitsandbytes' double quantization)
    # GPTQ only
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = False

    def __post_init__(self) -> None:
        for k, v in ALIASES.get(self.method, {}).items():
            object.__setattr__(self, k, v)
        for f in ("awq", "float_zero"):
            if not isinstance(getattr(self, f), bool):
                raise RecipeError(f"{f}={getattr(self, f)!r} is not allowed; allowed: true or false")
        if self.method == "hqq" and self.symmetric:
            raise RecipeError("method 'hqq' optimises the zero point: set symmetric: false")
        if self.float_zero and self.method != "hqq":
            raise RecipeError("float_zero applies to method 'hqq' only")
        rs = self.range_shrink
        rs = (rs,) if isinstance(rs, (int, float)) and not isinstance(rs, bool) else rs
        if (not isinstance(rs, (list, tuple)) or not rs
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in rs)):
            raise RecipeError(f"range_shrink={self.range_shrink!r} is not allowed; allowed: a list of fractions in (0, 1]")
        object.__setattr__(self, "range_shrink", tuple(float(v) for v in rs))
        if self.range_shrink != (1.0,) and self.method != "hqq":
            raise RecipeError("range_shrink applies to method 'hqq' only (rtn and gptq search ranges with observer: mse)")
        if self.awq and self.method == "hqq":
            raise RecipeError("awq combines with 'rtn' or 'gptq', not 'hqq' (HQQ uses no calibration data)")
        if self.method in ("nf4", "fp4"):
            if self.bits != 4:
                raise RecipeError(f"method {self.method!r} is a 4-bit code book; bits must be 4, got {self.bits}")
            if self.act_bits is not None or self.awq or self.smoothquant is not None or self.type != "int":
                raise RecipeError(f"method {self.method!r} is weight-only bitsandbytes quantization; it does not "
                                  "combine with act_bits, awq, smoothquant or type float")
            if self.group_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
                raise RecipeError(f"{self.method} blocksize (group_size) must be a power of 2 in 32..4096 "
                                  f"(bitsandbytes uses 64), got {self.group_size!r}")
        if not isinstance(self.double_quant, bool):
            raise RecipeError(f"double_quant={self.double_quant!r} is not allowed; allowed: true or false")
        if self.group_axis == 0 and (self.method not in ("rtn", "hqq") or self.awq or self.smoothquant is not None
                                     or self.act_bits is not None):
            raise RecipeError("group_axis 0 (groups along the output dimension) is for weight-only 'rtn' or 'hqq' "
                              "without awq/smoothquant; GPTQ and the activation-aware searches group input columns")
        if self.type == "float" and self.method == "hqq":
            raise RecipeError("method 'hqq' makes integer weights; use rtn or gptq for type float (FP8)")
        sq = self.smoothquant
        if sq is not None and sq != "auto" and (isinstance(sq, bool) or not isinstance(sq, (int, float)) or not 0 <= sq <= 1):
            raise RecipeError(f"smoothquant={sq!r} is not allowed; allowed: a migration strength in [0, 1] or 'auto'")
        if sq is not None and self.act_bits is None:
            raise RecipeError("smoothquant moves activation outliers into the weights; it needs act_bits: 8")
        if sq is not None and self.awq:
            raise RecipeError("a step uses either awq or smoothquant scales, not both")
        self.act_scheme()
        if self.method not in METHODS:
            raise RecipeError(f"method={self.method!r} is not allowed; allowed: "
                              f"{list(METHODS + PRUNE_METHODS + LOWRANK_METHODS + ('drop_blocks', 'shrink', 'merge_kv'))}")
        _check_targets(self)
        if self.observer not in OBSERVERS:
            raise RecipeError(f"observer={self.observer!r} is not allowed; allowed: {list(OBSERVERS)}")
        self.scheme()
        self.gptq_config()

    def scheme(self) -> QuantScheme:
        strategy = self.strategy
        gs = self.group_size
        if strategy is None:
            strategy = "channel" if gs in (None, -1) else "group"
        if strategy not in STRATEGIES:
            raise RecipeError(f"strategy={strategy!r} is not allowed; allowed: {list(STRATEGIES)}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise RecipeError(f"bits={self.bits!r} is not allowed; allowed: integers 2..8")
        if strategy == "group" and (not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0):
            raise RecipeError(f"group_size={gs!r} is not allowed; allowed: a positive integer, or -1 for per-channel")
        if not isinstance(self.symmetric, bool):
            raise RecipeError(f"symmetric={self.symmetric!r} is not allowed; allowed: true or false")
        try:
            return QuantScheme(self.bits, self.symmetric, strategy, gs if strategy == "group" else None, self.type,
                               self.group_axis)
        except ValueError as e:
            raise RecipeError(str(e)) from None

    def describe(self) -> str:
        m = f"awq+{self.method}" if self.awq and self.method != "rtn" else ("awq" if self.awq else self.method)
        return f"smoothquant+{m}" if self.smoothquant is not None else m

    def act_scheme(self) -> ActScheme | None:
        if self.act_bits is None:
            return None
        if not isinstance(self.act_dynamic, bool):
            raise RecipeError(f"act_dynamic={self.act_dynamic!r} is not allowed; allowed: true or false")
        try:
            return ActScheme(self.act_bits, self.act_type, self.act_strategy, self.act_dynamic)
        except ValueError as e:
            raise RecipeError(str(e)) from None

    def gptq_config(self) -> GPTQConfig:
        try:
            return GPTQConfig(float(self.damp), int(self.block_size), bool(self.act_order),
                              bool(self.static_groups), self.observer)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"bad GPTQ field: {e}") from None

def _fields(step: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(step)}


def _step_fields() -> set[str]:
    return _fields(QuantStep)


@dataclass(frozen=True)
class PruneStep(_Targeted):
    """Zero weights of the targeted linear layers: ``sparsity`` of each layer (unstructured) or
    ``pattern`` N:M (N kept of every M consecutive inputs). magnitude needs no data; wanda
    (``|W| * ||x||``) and sparsegpt (Hessian-based reconstruction) use the calibration pass. A
    later quantization step on the same layer keeps the mask (GPTQ compensates around it);
    ``joint: true`` (sparsegpt) instead quantizes in SparseGPT's own sweep with that step's grid."""

    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: str = "unstructured"  # unstructured | "N:M" such as "2:4"
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[dict, ...] = ()
    damp: float = 0.01  # sparsegpt
    block_size: int = 128  # sparsegpt
    joint: bool = False  # sparsegpt: quantize in the same sweep (with the next quantization step's grid)
    owl: bool = False  # unstructured: per-block sparsity from activation outliers (OWL), same average
    owl_lambda: float = 0.08  # OWL: sparsities spread over [sparsity - lambda, sparsity + lambda]
    owl_m: float = 5.0  # OWL: a score is an outlier above m x the block's mean score

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise RecipeError(f"method={self.method!r} is not allowed; allowed: {list(METHODS + PRUNE_METHODS)}")
        if not isinstance(self.joint, bool):
            raise RecipeError(f"joint={self.joint!r} is not allowed; allowed: true or false")
        if self.joint and self.method != "sparsegpt":
            raise RecipeError("joint (sparse + quantized in one solve) is for method 'sparsegpt'")
        if not isinstance(self.owl, bool):
            raise RecipeError(f"owl={self.owl!r} is not allowed; allowed: true or false")
        if self.owl and self.pattern != "unstructured":
            raise RecipeError("owl varies the sparsity per block; it applies to pattern 'unstructured', not N:M")
        if self.owl and not (0 <= self.owl_lambda < min(self.sparsity, 1 - self.sparsity) + 1e-9) or self.owl_m <= 0:
            raise RecipeError(f"owl_lambda={self.owl_lambda!r} must be in [0, min(sparsity, 1 - sparsity)) and "
                              f"owl_m={self.owl_m!r} positive")
        self.pattern_()
        try:
            from llmpress.prune.sparsegpt import SparseGPTConfig

            SparseGPTConfig(float(self.damp), int(self.block_size))
        except (TypeError, ValueError) as e:
            raise RecipeError(f"bad SparseGPT field: {e}") from None
        _check_targets(self)

    def pattern_(self):
        from llmpress.prune.masks import SparsityPattern

        try:
            return SparsityPattern.parse(self.pattern, self.sparsity)
        except ValueError as e:
            raise RecipeError(str(e)) from None

    def describe(self) -> str:
        return f"{self.method} {self.pattern_().describe()}" + (" joint" if self.joint else "") + (" owl" if self.owl else "")


@dataclass(frozen=True)
class DropBlocksStep:
    """Remove whole decoder blocks (the model gets shallower; config.json follows): ``blocks``
    of them, or ``fraction`` of the stack (rounded up), chosen by ``importance``: ``angular``
    (the blocks that change the hidden states least, measured on the calibration data),
    ``contiguous`` (the closest run of consecutive blocks) or ``last``. Comes before the
    per-layer steps, whose layer names then refer to the remaining blocks."""

    method: str = "drop_blocks"
    blocks: int | None = None
    fraction: float | None = None
    importance: str = "angular"

    def __post_init__(self) -> None:
        from llmpress.prune.structured import IMPORTANCE

        if self.method != "drop_blocks":
            raise RecipeError(f"method={self.method!r} is not allowed here; use 'drop_blocks'")
        if (self.blocks is None) == (self.fraction is None):
            raise RecipeError("drop_blocks needs exactly one of 'blocks' (a count) or 'fraction' (of the blocks)")
        if self.blocks is not None and (isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1):
            raise RecipeError(f"blocks={self.blocks!r} is not allowed; allowed: a positive integer")
        if self.fraction is not None and (isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
                                          or not 0 < self.fraction < 1):
            raise RecipeError(f"fraction={self.fraction!r} is not allowed; allowed: a number in (0, 1)")
        if self.importance not in IMPORTANCE:
            raise RecipeError(f"importance={self.importance!r} is not allowed; allowed: {list(IMPORTANCE)}")

    def count(self, n_blocks: int) -> int:
        import math

        k = self.blocks if self.blocks is not None else math.ceil(self.fraction * n_blocks - 1e-9)
        if not 0 < k < n_blocks:
            raise RecipeError(f"drop_blocks would remove {k} of {n_blocks} blocks; at least one must remain")
        return k

    def describe(self) -> str:
        n = self.blocks if self.blocks is not None else f"{self.fraction:.0%}"
        return f"drop {n} blocks ({self.importance})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LowRankStep(_Targeted):
    """Factor the targeted linear layers into two thin ones (``LowRankLinear``) keeping
    ``ratio`` of each layer's parameters: ``svd`` (truncated SVD of W) or ``asvd``
    (activation-aware: whitened by the calibration inputs' second moment)."""

    method: str = "asvd"
    ratio: float = 0.8
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[dict, ...] = ()
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.method not in LOWRANK_METHODS:
            raise RecipeError(f"method={self.method!r} is not allowed; allowed: {list(LOWRANK_METHODS)}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise RecipeError(f"ratio={self.ratio!r} is not allowed; allowed: the fraction of parameters kept, in (0, 1)")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise RecipeError(f"damp={self.damp!r} is not allowed; allowed: [0, 1)")
        _check_targets(self)

    def describe(self) -> str:
        return f"{self.method} {self.ratio:.0%}"


@dataclass(frozen=True)
class ShrinkStep:
    """Narrow every decoder block: remove ``mlp`` (a fraction) of the MLP intermediate channels
    and ``kv_groups`` key/value head groups per layer (each group's KV head with every query
    head that reads it, so grouped-query layouts stay consistent), the least important by
    ``|W| * ||x||`` measured on the calibration data. config.json follows (intermediate_size,
    head counts, head_dim); plain transformers loads the result."""

    method: str = "shrink"
    mlp: float | None = None
    kv_groups: int | None = None
    kv_heads: int | None = None  # method merge_kv: the key/value heads to keep (mean-pooled groups)

    def __post_init__(self) -> None:
        if self.method not in ("shrink", "merge_kv"):
            raise RecipeError(f"method={self.method!r} is not allowed here; use 'shrink' or 'merge_kv'")
        if self.method == "merge_kv":
            if self.mlp is not None or self.kv_groups is not None:
                raise RecipeError("merge_kv takes only kv_heads (use a separate shrink step for mlp / kv_groups)")
            if isinstance(self.kv_heads, bool) or not isinstance(self.kv_heads, int) or self.kv_heads < 1:
                raise RecipeError(f"kv_heads={self.kv_heads!r} is not allowed; allowed: a positive integer dividing "
                                  "the model's key/value heads (1 = multi-query attention)")
            return
        if self.kv_heads is not None:
            raise RecipeError("kv_heads belongs to method 'merge_kv'")
        if self.mlp is None and self.kv_groups is None:
            raise RecipeError("shrink needs 'mlp' (fraction of intermediate channels removed) and/or 'kv_groups' "
                              "(key/value head groups removed per layer)")
        if self.mlp is not None and (isinstance(self.mlp, bool) or not isinstance(self.mlp, (int, float))
                                     or not 0 < self.mlp < 1):
            raise RecipeError(f"mlp={self.mlp!r} is not allowed; allowed: the fraction of channels removed, in (0, 1)")
        if self.kv_groups is not None and (isinstance(self.kv_groups, bool) or not isinstance(self.kv_groups, int)
                                           or self.kv_groups < 1):
            raise RecipeError(f"kv_groups={self.kv_groups!r} is not allowed; allowed: a positive integer (whole "
                              "key/value groups, so grouped-query attention stays consistent)")

    def describe(self) -> str:
        if self.method == "merge_kv":
            return f"merge kv heads -> {self.kv_heads}"
        parts = ([f"mlp -{self.mlp:.0%}"] if self.mlp else []) + ([f"-{self.kv_groups} kv groups"] if self.kv_groups else [])
        return "shrink " + ", ".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RecoverStep:
    """Recovery after the compression steps (the last step of a recipe): knowledge distillation
    from the model as it was before compression, on ``n_samples`` sequences of ``seqlen`` tokens
    of ``data`` (a corpus name: its calibration split; or a text file). ``train: qat`` fine-tunes
    the quantized weights through their grid (``learn_scales``: the scales too) and leaves an
    integer model; ``train: full`` trains every weight of a dense student (after drop_blocks /
    shrink / pruning). LoRA adapters live outside the checkpoint: use ``llmpress recover`` for them."""

    method: str = "recover"
    train: str = "qat"
    steps: int = 100
    lr: float | None = None  # qat 1e-2 (grid steps / relative scale change per step), full 5e-5
    batch_size: int = 2
    grad_accum: int = 1
    seqlen: int = 256
    n_samples: int | None = None
    data: str = "wiki"
    kd: str = "forward"
    temperature: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    learn_scales: bool = True
    learn_weights: bool = True
    scale_lr_ratio: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method != "recover":
            raise RecipeError(f"method={self.method!r} is not allowed here; use 'recover'")
        if self.train not in ("qat", "full"):
            raise RecipeError(f"recover: train={self.train!r} is not allowed; allowed: 'qat', 'full' (LoRA adapters "
                              "are kept outside the checkpoint: use `llmpress recover` for LoRA / QLoRA)")
        for k in ("steps", "batch_size", "grad_accum", "seqlen"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RecipeError(f"recover: {k}={v!r} must be a positive integer")
        if self.n_samples is not None and (not isinstance(self.n_samples, int) or self.n_samples < self.batch_size):
            raise RecipeError(f"recover: n_samples={self.n_samples!r} must be an integer >= batch_size")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise RecipeError(f"recover: lr={self.lr!r} must be a positive number")
        if self.train == "qat" and not (self.learn_weights or self.learn_scales):
            raise RecipeError("recover: qat needs learn_weights or learn_scales")
        try:
            self.config()
        except ValueError as e:
            raise RecipeError(f"recover: {e}") from None

    def samples(self) -> int:
        return self.n_samples or max(self.steps * self.batch_size * self.grad_accum // 2, 64)

    def config(self):
        from llmpress.recover.train import DEFAULT_LR, RecoverConfig

        lr = self.lr if self.lr is not None else DEFAULT_LR[self.train]
        return RecoverConfig(steps=self.steps, lr=float(lr), batch_size=self.batch_size, grad_accum=self.grad_accum,
                             temperature=self.temperature, kd=self.kd, ce_weight=self.ce_weight, train=self.train,
                             hidden_weight=self.hidden_weight, warmup=max(self.steps // 10, 1), seed=self.seed,
                             scale_lr_ratio=self.scale_lr_ratio)

    def describe(self) -> str:
        return f"recover ({self.train}, {self.steps} steps, KD {self.kd})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MODEL_STEPS = (DropBlocksStep, ShrinkStep)
Step = QuantStep | PruneStep | LowRankStep


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step | DropBlocksStep | ShrinkStep, ...]
    name: str = "custom"
    recover: RecoverStep | None = None  # a recipe's last step, kept apart: it runs after the others

    def __post_init__(self) -> None:
        if not self.steps:
            raise RecipeError("a recipe needs at least one compression step"
                              + (" before 'recover'" if self.recover is not None else ""))
        kinds = [isinstance(s, (DropBlocksStep, ShrinkStep)) for s in self.steps]
        if any(kinds) and kinds != sorted(kinds, reverse=True):
            raise RecipeError("drop_blocks / shrink steps change the model's shape: put them before the per-layer steps")

    @property
    def needs_calibration(self) -> bool:
        def calib(d: dict) -> bool:
            static = d.get("act_bits") is not None and d.get("act_dynamic") is False
            return (d.get("method") in ("gptq", "awq", "wanda", "sparsegpt", "asvd") or bool(d.get("awq"))
                    or (d.get("method") == "drop_blocks" and d.get("importance") != "last") or d.get("method") == "shrink"
                    or d.get("smoothquant") is not None or static)

        return any(calib(s.to_dict()) or any(calib(o) for o in getattr(s, "overrides", ())) for s in self.steps)

    def to_dict(self) -> dict:
        rec = [self.recover.to_dict()] if self.recover is not None else []
        return {"name": self.name, "steps": [s.to_dict() for s in self.steps] + rec}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: Any, name: str = "custom") -> Recipe:
        if isinstance(d, list):
            d = {"steps": d}
        if not isinstance(d, dict) or "steps" not in d:
            raise RecipeError("a recipe is a mapping with a 'steps' list (or a bare list of steps)")
        extra = set(d) - {"name", "steps"}
        if extra:
            raise RecipeError(f"unknown top-level recipe field(s) {sorted(extra)}; allowed: ['name', 'steps']")
        steps = []
        rec = None
        raw = list(d["steps"] or [])
        for i, s in enumerate(raw):
            if not isinstance(s, dict):
                raise RecipeError(f"step {i} must be a mapping, got {s!r}")
            if s.get("method") == "recover":
                if i != len(raw) - 1:
                    raise RecipeError(f"step {i}: 'recover' must be the last step (it trains the compressed model)")
                extra = set(s) - _fields(RecoverStep)
                if extra:
                    raise RecipeError(f"step {i}: unknown field(s) {sorted(extra)}; allowed: {sorted(_fields(RecoverStep))}")
                try:
                    rec = RecoverStep(**s)
                except (RecipeError, TypeError) as e:
                    raise RecipeError(f"step {i}: {e}") from None
                continue
            cls_ = (PruneStep if s.get("method") in PRUNE_METHODS
                    else LowRankStep if s.get("method") in LOWRANK_METHODS
                    else DropBlocksStep if s.get("method") == "drop_blocks"
                    else ShrinkStep if s.get("method") in ("shrink", "merge_kv") else QuantStep)
            extra = set(s) - _fields(cls_)
            if extra:
                raise RecipeError(f"step {i}: unknown field(s) {sorted(extra)}; allowed: {sorted(_fields(cls_))}")
            try:
                steps.append(cls_(**s))
            except RecipeError as e:
                raise RecipeError(f"step {i}: {e}") from None
        return cls(tuple(steps), str(d.get("name", name)), rec)


PRESETS: dict[str, dict | list[dict]] = {
    "w8a16": dict(method="rtn", bits=8, group_size=-1),
    "w4a16-rtn": dict(method="rtn", bits=4),
    "w3a16-rtn": dict(method="rtn", bits=3),
    # GPTQ presets search each group's scale against the Hessian-weighted error (observer mse)
    "w4a16-gptq": dict(method="gptq", bits=4, observer="mse"),
    "w3a16-gptq": dict(method="gptq", bits=3, observer="mse"),
    "w8a16-gptq": dict(method="gptq", bits=8, group_size=-1, observer="mse"),
    # AWQ: activation-aware scales folded into the previous op, then activation-aware clipping
    # (observer mse weighted by the layer's inputs) and rounding, or GPTQ on the scaled weights
    # bitsandbytes NF4 / FP4, block 64, double quantization (identical to bitsandbytes)
    "nf4": dict(method="nf4", bits=4, group_size=64),
    "fp4": dict(method="fp4", bits=4, group_size=64),
    # HQQ: calibration-free half-quadratic zero-point optimisation (asymmetric)
    # with float zero points as the reference keeps them (float_zero: false for vLLM-loadable ones)
    "w4a16-hqq": dict(method="hqq", bits=4, symmetric=False, float_zero=True),
    # 2-3 bits: groups of output rows (HQQ's axis=0) were far better on smollm2-135m (BENCHMARKS.md)
    "w3a16-hqq": dict(method="hqq", bits=3, symmetric=False, float_zero=True, group_axis=0),
    "w2a16-hqq": dict(method="hqq", bits=2, symmetric=False, float_zero=True, group_axis=0, range_shrink=(1.0, 0.8)),
    "w8a16-hqq": dict(method="hqq", bits=8, symmetric=False, float_zero=True),
    # W8A8: 8-bit weights per channel and 8-bit activations per token (dynamic)
    "w8a8-fp8": dict(method="rtn", type="float", bits=8, group_size=-1, act_bits=8, act_type="float"),
    "w8a8-int8": dict(method="gptq", bits=8, group_size=-1, observer="mse", act_bits=8, smoothquant="auto"),
    "w8a8-int8-static": dict(method="gptq", bits=8, group_size=-1, observer="mse", act_bits=8,
                             act_strategy="tensor", act_dynamic=False, smoothquant="auto"),
    "w4a16-awq": dict(method="rtn", awq=True, bits=4, observer="mse"),
    "w3a16-awq": dict(method="rtn", awq=True, bits=3, observer="mse"),
    "w4a16-awq-gptq": dict(method="gptq", awq=True, bits=4, observer="mse"),
    "w3a16-awq-gptq": dict(method="gptq", awq=True, bits=3, observer="mse"),
    # pruning: half of every layer's weights (unstructured) or 2 of every 4 (semi-structured)
    "sparse50-magnitude": dict(method="magnitude", sparsity=0.5),
    "sparse50-wanda": dict(method="wanda", sparsity=0.5),
    "sparse50-sparsegpt": dict(method="sparsegpt", sparsity=0.5),
    "2of4-magnitude": dict(method="magnitude", pattern="2:4"),
    "2of4-wanda": dict(method="wanda", pattern="2:4"),
    "2of4-sparsegpt": dict(method="sparsegpt", pattern="2:4"),
    # 2:4 sparse + 4-bit: the SparseGPT mask, then GPTQ keeping it
    # structured: a quarter of the decoder blocks removed (those changing the hidden states least)
    "drop25-angular": dict(method="drop_blocks", fraction=0.25),
    "shrink-mlp25": dict(method="shrink", mlp=0.25),
    # low-rank: 80% of each linear's parameters, activation-aware (whitened) or plain SVD
    "asvd80": dict(method="asvd", ratio=0.8),
    "svd80": dict(method="svd", ratio=0.8),
    "2of4-sparsegpt-w4a16": [dict(method="sparsegpt", pattern="2:4"),
                             dict(method="gptq", bits=4, observer="mse", act_order=False)],
}


def recipe(name_or_path: str | Path, **overrides: Any) -> Recipe:
    """A named preset (group size etc. as keyword overrides, e.g. ``group_size=64``), or a
    YAML / JSON recipe file."""
    s = str(name_or_path)
    if s in PRESETS:
        p = PRESETS[s]
        r = Recipe.from_dict({"steps": [dict(d) for d in (p if isinstance(p, list) else [p])]}, name=s)
        return _with_overrides(r, overrides, preset=True)
    p = Path(s)
    if not p.is_file():
        raise RecipeError(f"unknown recipe {s!r}: not a preset {sorted(PRESETS)} nor a YAML/JSON file")
    text = p.read_text()
    try:
        d = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise RecipeError(f"{p}: not valid YAML/JSON: {e}") from None
    return _with_overrides(Recipe.from_dict(d, name=p.stem), overrides)


def _with_overrides(r: Recipe, overrides: dict[str, Any], preset: bool = False) -> Recipe:
    """Apply keyword overrides to every step that has the field (e.g. group_size to the
    quantization step of a prune + quantize recipe)."""
    kw = {k: v for k, v in overrides.items() if v is not None}
    if not kw:
        return r
    known = set().union(*(_fields(st) for st in r.steps))
    extra = set(kw) - known
    if extra:
        raise RecipeError(f"unknown field(s) {sorted(extra)}; allowed: {sorted(known)}")
    steps = []
    for st in r.steps:
        sub = {k: v for k, v in kw.items() if k in _fields(st)}
        if "group_size" in sub and "strategy" not in sub and "strategy" in _fields(st):
            sub["strategy"] = None
        try:
            steps.append(dataclasses.replace(st, **sub) if sub else st)
        except RecipeError as e:
            raise RecipeError(f"{r.name}: {e}") from None
    gs = kw.get("group_size")
    suffix = f"-g{gs}" if preset and gs not in (None, -1, 128) else ""
    return Recipe(tuple(steps), r.name + suffix, r.recover)
