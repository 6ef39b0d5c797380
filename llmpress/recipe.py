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
ALIASES = {"awq": dict(method="rtn", awq=True)}  # shorthand method names


class RecipeError(ValueError):
    """A recipe field has a bad value; the message names the field and what is allowed."""


def match(target: str, name: str, cls_name: str) -> bool:
    """compressed-tensors' target semantics: ``re:`` regex (re.match), exact name, or class."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == cls_name


@dataclass(frozen=True)
class QuantStep:
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
            raise RecipeError(f"method={self.method!r} is not allowed; allowed: {list(METHODS)}")
        for f in ("targets", "ignore", "overrides"):
            v = getattr(self, f)
            if isinstance(v, (str, dict)) or not isinstance(v, (list, tuple)):
                raise RecipeError(f"{f} must be a list, got {type(v).__name__}: {v!r}")
            object.__setattr__(self, f, tuple(v))
        if not self.targets:
            raise RecipeError("targets must name at least one module pattern (e.g. [Linear])")
        for bad in [t for t in self.targets + self.ignore if not isinstance(t, str)]:
            raise RecipeError(f"targets/ignore entries must be strings, got {bad!r}")
        for t in self.targets + self.ignore:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise RecipeError(f"bad regex {t!r} in targets/ignore: {e}") from None
        for o in self.overrides:
            if not isinstance(o, dict) or "pattern" not in o:
                raise RecipeError(f"each override needs a 'pattern' key, got {o!r}")
            allowed = {"pattern", "skip"} | (_step_fields() - {"targets", "ignore", "overrides"})
            extra = set(o) - allowed
            if extra:
                raise RecipeError(f"override {o['pattern']!r}: unknown field(s) {sorted(extra)}; allowed: {sorted(allowed)}")
            if not o.get("skip"):
                self.with_override(o)  # validates the merged values
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

    def with_override(self, o: dict) -> QuantStep:
        kw = {k: v for k, v in o.items() if k not in ("pattern", "skip")}
        if "group_size" in kw and "strategy" not in kw:
            kw["strategy"] = None
        return dataclasses.replace(self, overrides=(), **kw)

    def resolve(self, name: str, cls_name: str = "Linear") -> QuantStep | None:
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
        for k in ("targets", "ignore", "overrides"):
            d[k] = list(d[k])
        return d


def _step_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(QuantStep)}


@dataclass(frozen=True)
class Recipe:
    steps: tuple[QuantStep, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.steps:
            raise RecipeError("a recipe needs at least one step")

    @property
    def needs_calibration(self) -> bool:
        def calib(d: dict) -> bool:
            static = d.get("act_bits") is not None and d.get("act_dynamic") is False
            return d.get("method") in ("gptq", "awq") or bool(d.get("awq")) or d.get("smoothquant") is not None or static

        return any(calib(s.to_dict()) or any(calib(o) for o in s.overrides) for s in self.steps)

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": [s.to_dict() for s in self.steps]}

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
        for i, s in enumerate(d["steps"] or []):
            if not isinstance(s, dict):
                raise RecipeError(f"step {i} must be a mapping, got {s!r}")
            extra = set(s) - _step_fields()
            if extra:
                raise RecipeError(f"step {i}: unknown field(s) {sorted(extra)}; allowed: {sorted(_step_fields())}")
            try:
                steps.append(QuantStep(**s))
            except RecipeError as e:
                raise RecipeError(f"step {i}: {e}") from None
        return cls(tuple(steps), str(d.get("name", name)))


PRESETS: dict[str, dict] = {
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
    "w2a16-hqq": dict(method="hqq", bits=2, symmetric=False, float_zero=True, group_axis=0),
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
}


def recipe(name_or_path: str | Path, **overrides: Any) -> Recipe:
    """A named preset (group size etc. as keyword overrides, e.g. ``group_size=64``), or a
    YAML / JSON recipe file."""
    s = str(name_or_path)
    if s in PRESETS:
        kw = {**PRESETS[s], **{k: v for k, v in overrides.items() if v is not None}}
        extra = set(kw) - _step_fields()
        if extra:
            raise RecipeError(f"unknown field(s) {sorted(extra)}; allowed: {sorted(_step_fields())}")
        suffix = "" if kw.get("group_size") in (None, -1, 128) else f"-g{kw['group_size']}"
        return Recipe((QuantStep(**kw),), s + suffix)
    p = Path(s)
    if not p.is_file():
        raise RecipeError(f"unknown recipe {s!r}: not a preset {sorted(PRESETS)} nor a YAML/JSON file")
    text = p.read_text()
    try:
        d = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise RecipeError(f"{p}: not valid YAML/JSON: {e}") from None
    r = Recipe.from_dict(d, name=p.stem)
    if overrides:
        r = Recipe(tuple(dataclasses.replace(st, **{k: v for k, v in overrides.items() if v is not None}) for st in r.steps), r.name)
    return r
