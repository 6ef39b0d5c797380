"""Choose one setting per unit to meet a budget with the least predicted KL (a multiple-choice
knapsack, solved exactly by dynamic programming over a storage grid), and write the choice as
a recipe anyone can read and edit."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import yaml

from llmpress.plan.sensitivity import Option, Sensitivity
from llmpress.recipe import Recipe, RecipeError


class BudgetError(ValueError):
    """The budget cannot be met by any allocation; the message gives the feasible range."""


@dataclass
class Plan:
    sens: Sensitivity
    choice: list[int]  # per unit: index into its options
    target: str  # what was asked, e.g. "3.5 bits/weight"

    def option(self, i: int) -> Option:
        return self.sens.units[i].options[self.choice[i]]

    @property
    def kl(self) -> float:
        return sum(self.option(i).kl for i in range(len(self.choice)))

    @property
    def planned_bytes(self) -> int:
        return sum(self.option(i).nbytes for i in range(len(self.choice)))

    @property
    def size_mb(self) -> float:
        """The checkpoint: everything not planned, the planned layers, their headers."""
        return (self.sens.fixed_bytes + self.planned_bytes + sum(u.overhead for u in self.sens.units)) / 1e6

    @property
    def avg_bits(self) -> float:
        return 8 * self.planned_bytes / sum(u.params for u in self.sens.units)

    def layers(self) -> list[dict]:
        """One row per linear layer: its setting and its unit's predicted KL."""
        rows = []
        for i, u in enumerate(self.sens.units):
            o = self.option(i)
            for n in u.names:
                rows.append(dict(name=n, block=u.block, bits=o.bits, group_size=o.group_size,
                                 symmetric=o.sym(self.sens.symmetric), unit_kl=o.kl))
        return rows

    def summary(self) -> dict:
        return dict(target=self.target, avg_bits=self.avg_bits, size_mb=self.size_mb, predicted_kl=self.kl,
                    units=len(self.choice), layers=sum(len(u.names) for u in self.sens.units))

    def recipe(self, name: str | None = None) -> Recipe:
        """One step with the setting covering the most weights, and one override per other
        (setting, layer role) listing the blocks that take it."""
        step = self.sens.base_step()
        weight: dict[tuple[int, int, bool], int] = defaultdict(int)
        for i, u in enumerate(self.sens.units):
            weight[self._key(i)] += u.params
        top = max(weight, key=lambda k: (weight[k], k))
        roles: dict[tuple[tuple[int, int, bool], tuple[str, ...]], list[tuple[int | None, tuple[str, ...]]]] = defaultdict(list)
        for i, u in enumerate(self.sens.units):
            if self._key(i) != top:
                roles[(self._key(i), tuple(_role(n, u.block) for n in u.names))].append((u.block, u.names))
        overrides = []
        for ((bits, gs, sym), role), members in sorted(roles.items(), key=lambda kv: kv[0]):
            ov = dict(pattern=_pattern(role, members), bits=bits, group_size=gs)
            if sym != top[2]:
                ov["symmetric"] = sym
            overrides.append(ov)
        return Recipe((dataclasses.replace(step, bits=top[0], group_size=top[1], symmetric=top[2], strategy=None,
                                           overrides=tuple(overrides)),), name or f"plan-{_slug(self.target)}")

    def _key(self, i: int) -> tuple[int, int, bool]:
        o = self.option(i)
        return (o.bits, o.group_size, o.sym(self.sens.symmetric))

    def to_yaml(self, name: str | None = None) -> str:
        s = self.summary()
        head = [
            f"# planned by `llmpress plan` for {self.sens.model}: target {self.target}",
            f"# {s['layers']} layers in {s['units']} units (layers reading the same input share a setting)",
            f"# average {s['avg_bits']:.3f} bits/weight over the planned layers; checkpoint ~{s['size_mb']:.2f} MB; "
            f"predicted KL {s['predicted_kl']:.4f} nats/token (sum of per-unit estimates)",
            "# edit freely: the first matching override wins; run with `llmpress compress MODEL --recipe THIS_FILE`",
        ]
        table = ["#", "# block  bits/group per unit" + (" (a: asymmetric, integer zero points):" if any(
            self._key(i)[2] != self.sens.symmetric for i in range(len(self.choice))) else ":")]
        by_block: dict = defaultdict(list)
        for i, u in enumerate(self.sens.units):
            o = self.option(i)
            by_block[u.block].append(f"{'+'.join(n.rsplit('.', 1)[-1] for n in u.names)}={o.label(self.sens.symmetric)}")
        for b in sorted(by_block, key=lambda x: -1 if x is None else x):
            table.append(f"#   {b}: " + "  ".join(by_block[b]))
        return "\n".join(head + table) + "\n" + yaml.safe_dump(_compact(self.recipe(name)), sort_keys=False, width=200)


def _role(name: str, block: int | None) -> str:
    """The name with the block index replaced: 'model.layers.{}.mlp.down_proj'."""
    if block is None:
        return name
    return re.sub(rf"\.{block}\.", ".{}.", name, count=1)


def _pattern(role: tuple[str, ...], members: list[tuple[int | None, tuple[str, ...]]]) -> str:
    """One regex for the layers of units with the same roles, e.g.
    're:^model\\.layers\\.(3|7)\\.mlp\\.(gate_proj|up_proj)$'."""
    if any(b is None for b, _ in members) or any("{}" not in r for r in role):
        return "re:^(" + "|".join(re.escape(n) for _, ns in members for n in ns) + ")$"
    heads = {r.split("{}", 1)[0] for r in role}
    tails = [r.split("{}", 1)[1] for r in role]
    blocks = "|".join(str(b) for b in sorted({b for b, _ in members}))
    if len(heads) != 1:
        return "re:^(" + "|".join(re.escape(n) for _, ns in members for n in ns) + ")$"
    stem = tails[0].rsplit(".", 1)[0] + "." if all("." in t for t in tails) else ""
    if stem and all(t.startswith(stem) for t in tails) and len(tails) > 1:
        leaves = "|".join(re.escape(t[len(stem):]) for t in tails)
        return f"re:^{re.escape(heads.pop())}({blocks}){re.escape(stem)}({leaves})$"
    return f"re:^{re.escape(heads.pop())}({blocks})({'|'.join(re.escape(t) for t in tails)})$"


def _compact(r: Recipe) -> dict:
    """The recipe's steps with only the fields that differ from their defaults."""
    out = []
    for st in r.steps:
        d = st.to_dict()
        default = type(st)().to_dict()
        keep = {"method", "bits", "group_size", "symmetric"}
        out.append({k: v for k, v in d.items() if k in keep or v != default.get(k)})
    return {"name": r.name, "steps": out}


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", s.replace("bits/weight", "bpw").replace(" ", ""))


def _dp(sens: Sensitivity, cap: int, grid: int = 200_000) -> tuple[np.ndarray, np.ndarray, float]:
    """Multiple-choice knapsack by dynamic programming over storage steps of ``q`` bytes up to
    ``cap``: best[b] = least total KL within b steps, and the per-unit choices to recover it.
    ``q`` is the greatest common divisor of the option sizes when that keeps the table within
    ``grid`` steps (then the solution is exact), else cap / grid with sizes rounded up (a
    solution always fits, and at most one step per unit is lost)."""
    g = math.gcd(*(o.nbytes for u in sens.units for o in u.options))
    q = float(g) if g and cap / g <= grid else max(1.0, cap / grid)
    nb = int(cap // q) + 1
    inf = np.inf
    best = np.zeros(nb)
    picks = np.zeros((len(sens.units), nb), dtype=np.int16)
    for i, u in enumerate(sens.units):
        new = np.full(nb, inf)
        pick = np.zeros(nb, dtype=np.int16)
        for j, o in enumerate(u.options):
            s = math.ceil(o.nbytes / q)
            if s >= nb:
                continue
            cand = np.full(nb, inf)
            cand[s:] = best[: nb - s] + o.kl
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        best, picks[i] = new, pick
    return best, picks, q


def _trace(sens: Sensitivity, picks: np.ndarray, b: int, q: float) -> list[int]:
    choice = [0] * len(sens.units)
    for i in range(len(sens.units) - 1, -1, -1):
        j = int(picks[i, b])
        choice[i] = j
        b -= math.ceil(sens.units[i].options[j].nbytes / q)
    return choice


def allocate(sens: Sensitivity, *, target_bits: float | None = None, target_size_mb: float | None = None,
             max_kl: float | None = None) -> Plan:
    """The allocation with the least predicted KL within ``target_bits`` (average bits per
    planned weight, scales included) or ``target_size_mb`` (the whole checkpoint), or the
    smallest one whose predicted KL is at most ``max_kl``."""
    if sum(x is not None for x in (target_bits, target_size_mb, max_kl)) != 1:
        raise ValueError("give exactly one of target_bits, target_size_mb, max_kl")
    n_params = sum(u.params for u in sens.units)
    lo = sum(min(o.nbytes for o in u.options) for u in sens.units)
    hi = sum(max(o.nbytes for o in u.options) for u in sens.units)
    if max_kl is not None:
        if not max_kl >= 0:
            raise BudgetError(f"max_kl={max_kl} must be a non-negative number of nats per token")
        best, picks, q = _dp(sens, hi)
        ok = np.nonzero(best <= max_kl)[0]
        if len(ok) == 0:
            floor = sum(min(o.kl for o in u.options) for u in sens.units)
            raise BudgetError(f"max_kl={max_kl} is below the least predicted KL of any candidate allocation "
                              f"({floor:.4g}); raise it or add more bits to the candidates")
        return Plan(sens, _trace(sens, picks, int(ok[0]), q), f"KL <= {max_kl:g}")
    if target_bits is not None:
        cap = int(target_bits * n_params / 8)
        what, have = f"{target_bits:g} bits/weight", lambda b: 8 * b / n_params
        unit = "bits/weight"
    else:
        fixed = sens.fixed_bytes + sum(u.overhead for u in sens.units)
        cap = int(target_size_mb * 1e6) - fixed
        what, have = f"{target_size_mb:g} MB", lambda b: (b + fixed) / 1e6
        unit = "MB"
    if cap < lo:
        raise BudgetError(f"target {what} is below the smallest candidate allocation ({have(lo):.3f} {unit}; "
                          f"everything else in the checkpoint takes {(sens.fixed_bytes + sum(u.overhead for u in sens.units)) / 1e6:.2f} MB); "
                          "raise the target or add fewer-bit candidates")
    cap = min(cap, hi)
    best, picks, q = _dp(sens, cap)
    b = int(np.argmin(best))  # best is non-increasing in b, argmin finds the first of the least
    plan = Plan(sens, _trace(sens, picks, b, q), what)
    assert plan.planned_bytes <= cap + 1, (plan.planned_bytes, cap)
    return plan


def uniform(sens: Sensitivity, bits: int, group_size: int, symmetric: bool | None = None) -> Plan:
    """Every unit at one setting (for comparison; ``symmetric`` None: the step's); RecipeError
    if a unit lacks it."""
    sym = sens.symmetric if symmetric is None else symmetric
    choice = []
    for u in sens.units:
        js = [j for j, o in enumerate(u.options) if (o.bits, o.group_size, o.sym(sens.symmetric)) == (bits, group_size, sym)]
        if not js:
            raise RecipeError(f"{u.names[0]} has no candidate bits={bits} group_size={group_size} symmetric={sym}")
        choice.append(js[0])
    return Plan(sens, choice, f"uniform w{bits} g{group_size}" + ("" if sym == sens.symmetric else " asym" if not sym else " sym"))
