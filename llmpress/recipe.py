"""Recipes: an ordered list of steps, each a frozen, validated config.

YAML/JSON form::

    name: my-w4
    steps:
      - method: gptq          # rtn | gptq
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

from llmpress.quant.gptq import GPTQConfig
from llmpress.quant.primitives import OBSERVERS, STRATEGIES, QuantScheme

METHODS = ("rtn", "gptq")


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
    observer: str = "minmax"  # minmax | mse (clipping search; importance-weighted in GPTQ)
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[dict, ...] = ()
    # GPTQ only
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = False

    def __post_init__(self) -> None:
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
        return QuantScheme(self.bits, self.symmetric, strategy, gs if strategy == "group" else None)

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
        return any(s.method == "gptq" or any(o.get("method") == "gptq" for o in s.overrides) for s in self.steps)

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
