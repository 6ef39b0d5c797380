"""Structured shrinking that changes shapes: removing whole decoder blocks.

Importance of block ``i`` is the angular distance between the hidden states entering and
leaving it, averaged over the calibration tokens: ``arccos(cos(x_i, x_{i+1})) / pi`` (the block
influence of ShortGPT, Men et al. 2024, arXiv:2403.03853; the angular distance of Gromov et al.
2024, arXiv:2403.17887). Blocks that barely turn the residual stream are removed first.
``contiguous`` removes the run of ``n`` consecutive blocks whose input and output are closest
(Gromov et al.); ``last`` removes the final ``n`` blocks (the naive baseline).

The model is edited in place: the block list shrinks, attention modules get their new
``layer_idx`` (KV caches are indexed by it) and the config's ``num_hidden_layers`` and
per-layer lists (``layer_types``) follow, so ``save_pretrained`` writes a model that plain
transformers loads.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.models import find_blocks

if TYPE_CHECKING:
    from llmpress.recipe import DropBlocksStep, ShrinkStep

log = logging.getLogger(__name__)

IMPORTANCE = ("angular", "contiguous", "last")


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _forward_all(model: nn.Module, tokens: torch.Tensor, batch_size: int, hooks: list, desc: str, progress: bool,
                 after_batch=None) -> None:
    """Run ``model`` over ``tokens`` in batches (no KV cache), then remove ``hooks``. The hooks
    read the blocks; the output head is swapped out meanwhile, so no [batch, seq, vocab] logits
    are ever made (for a 49k vocabulary that is 0.8 GB per batch of 8 x 512)."""
    dev = next(model.parameters()).device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        model.set_output_embeddings(nn.Identity())
    try:
        for s in tqdm(range(0, tokens.shape[0], batch_size), desc=desc, disable=not progress):
            model(input_ids=tokens[s : s + batch_size].to(dev), use_cache=False)
            if after_batch is not None:
                after_batch()
    finally:
        if head is not None:
            model.set_output_embeddings(head)
        for h in hooks:
            h.remove()


@torch.no_grad()
def block_distances(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, span: int = 1,
                    progress: bool = False) -> torch.Tensor:
    """Mean angular distance (in [0, 1]) between the input of block ``i`` and the output of
    block ``i + span - 1``, for every start ``i`` (shape [n_blocks - span + 1])."""
    _, blocks = find_blocks(model)
    n = len(blocks)
    if not 1 <= span <= n:
        raise ValueError(f"span={span} must be in 1..{n}")
    states: list[torch.Tensor | None] = [None] * (n + 1)
    hooks = []
    for i, b in enumerate(blocks):
        def pre(mod, args, kwargs, i=i):
            states[i] = args[0] if args else kwargs["hidden_states"]

        def post(mod, args, out, i=i):
            states[i + 1] = _hidden(out)

        hooks.append(b.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(b.register_forward_hook(post))
    total = torch.zeros(n - span + 1, dtype=torch.float64)
    count = [0]

    def accumulate() -> None:
        for i in range(n - span + 1):
            a, b = states[i].float(), states[i + span].float()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)  # [B, S]
            total[i] += (torch.arccos(cos) / math.pi).double().sum().item()
        count[0] += states[0].shape[0] * states[0].shape[1]

    _forward_all(model, tokens, batch_size, hooks, "block distances", progress, accumulate)
    return (total / max(count[0], 1)).float()


def choose_blocks(model: nn.Module, n_drop: int, importance: str = "angular", tokens: torch.Tensor | None = None,
                  batch_size: int = 8, progress: bool = False) -> tuple[list[int], dict]:
    """Indices of the ``n_drop`` blocks to remove, and what the choice was based on."""
    _, blocks = find_blocks(model)
    n = len(blocks)
    if importance not in IMPORTANCE:
        raise ValueError(f"importance={importance!r} is not allowed; allowed: {list(IMPORTANCE)}")
    if not 0 < n_drop < n:
        raise ValueError(f"cannot remove {n_drop} of {n} blocks; choose 1..{n - 1}")
    if importance == "last":
        return list(range(n - n_drop, n)), {}
    if tokens is None:
        raise ValueError(f"importance {importance!r} needs calibration tokens")
    if importance == "contiguous":
        d = block_distances(model, tokens, batch_size, span=n_drop, progress=progress)
        start = int(torch.argmin(d))
        return list(range(start, start + n_drop)), {"run_distances": [round(float(x), 5) for x in d]}
    d = block_distances(model, tokens, batch_size, progress=progress)
    idx = sorted(int(i) for i in torch.argsort(d)[:n_drop])
    return idx, {"block_distances": [round(float(x), 5) for x in d]}


def drop_blocks(model: nn.Module, indices: list[int]) -> None:
    """Remove decoder blocks ``indices`` in place and make the config match."""
    name, blocks = find_blocks(model)
    n = len(blocks)
    drop = sorted(set(indices))
    if not drop or drop[0] < 0 or drop[-1] >= n or len(drop) >= n:
        raise ValueError(f"bad block indices {indices} for a model with {n} blocks")
    keep = [b for i, b in enumerate(blocks) if i not in drop]
    new = nn.ModuleList(keep)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    for j, b in enumerate(new):  # KV caches index layers by layer_idx
        for m in b.modules():
            if hasattr(m, "layer_idx") and isinstance(m.layer_idx, int):
                m.layer_idx = j
    cfg = model.config
    kept = [i for i in range(n) if i not in drop]
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, attr, None), int) and getattr(cfg, attr) == n:
            setattr(cfg, attr, len(kept))
    for attr in ("layer_types",):  # per-layer lists follow the kept blocks
        v = getattr(cfg, attr, None)
        if isinstance(v, (list, tuple)) and len(v) == n:
            setattr(cfg, attr, [v[i] for i in kept])
    prev = getattr(cfg, "llmpress_kept_blocks", None)  # original indices, across repeated removals
    orig = list(prev) if isinstance(prev, (list, tuple)) and len(prev) == n else list(range(n))
    cfg.llmpress_kept_blocks = [orig[i] for i in kept]  # lets distillation match hidden states
    log.info("removed blocks %s; %d blocks remain", drop, len(kept))


# --- attention heads and MLP channels ------------------------------------------------------

def _block_parts(block: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, nn.Linear]]:
    """The attention projections (q, k, v, o) and MLP projections (gate, up, down) of a
    Llama-style block, found by name; other layouts get a clear error."""
    attn = {k: getattr(getattr(block, "self_attn", None), f"{k}_proj", None) for k in "qkvo"}
    mlp = {k: getattr(getattr(block, "mlp", None), f"{k}_proj", None) for k in ("gate", "up", "down")}
    return attn, mlp


@torch.no_grad()
def channel_scores(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, progress: bool = False
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Wanda-style structured importance from one forward over ``tokens``: for every block,
    per MLP intermediate channel ``||x_j|| * ||W_down[:, j]||`` and per attention head the same
    summed over the head's input columns of ``o_proj``. Returns (mlp [I] per block, heads
    [H] per block)."""
    _, blocks = find_blocks(model)
    sq_o: list[torch.Tensor | None] = [None] * len(blocks)
    sq_d: list[torch.Tensor | None] = [None] * len(blocks)
    hooks = []

    def acc(store, i):
        def pre(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [B*S, K]
            s = x.pow(2).sum(0)
            store[i] = s if store[i] is None else store[i] + s
        return pre

    for i, b in enumerate(blocks):
        attn, mlp = _block_parts(b)
        if attn["o"] is not None:
            hooks.append(attn["o"].register_forward_pre_hook(acc(sq_o, i)))
        if mlp["down"] is not None:
            hooks.append(mlp["down"].register_forward_pre_hook(acc(sq_d, i)))
    _forward_all(model, tokens, batch_size, hooks, "channel importance", progress)
    mlp_scores, head_scores = [], []
    for i, b in enumerate(blocks):
        attn, mlp = _block_parts(b)
        if sq_d[i] is not None:
            mlp_scores.append(sq_d[i].sqrt() * mlp["down"].weight.float().norm(dim=0))
        if sq_o[i] is not None:
            per_col = sq_o[i].sqrt() * attn["o"].weight.float().norm(dim=0)  # [H*d]
            head_scores.append(per_col.reshape(_heads(model.config, b)[0], -1).sum(1))
    return mlp_scores, head_scores


def _heads(cfg, block: nn.Module | None = None) -> tuple[int, int, int]:
    h = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    return h, kv, d


def _keep_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach()[idx].clone(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach()[idx].clone(), requires_grad=False)
    lin.out_features = len(idx)


def _keep_cols(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach()[:, idx].clone(), requires_grad=False)
    lin.in_features = len(idx)


def shrink(model: nn.Module, mlp_keep: int | None, kv_keep: int | None, mlp_scores: list[torch.Tensor],
           head_scores: list[torch.Tensor]) -> dict:
    """Keep the ``mlp_keep`` most important intermediate channels and the ``kv_keep`` most
    important key/value head groups (each with all the query heads that read it) in every
    block, in place; the config's ``intermediate_size``, head counts and ``head_dim`` follow."""
    cfg = model.config
    _, blocks = find_blocks(model)
    h0, kv0, d0 = _heads(cfg, None)
    out: dict = {}
    for i, b in enumerate(blocks):
        attn, mlp = _block_parts(b)
        if mlp_keep is not None:
            if None in mlp.values():
                raise ValueError(f"block {i}: no gate/up/down projections found; MLP shrinking supports "
                                 "Llama-style gated MLPs (gate_proj, up_proj, down_proj)")
            idx = torch.sort(torch.argsort(mlp_scores[i], descending=True)[:mlp_keep]).values
            _keep_rows(mlp["gate"], idx)
            _keep_rows(mlp["up"], idx)
            _keep_cols(mlp["down"], idx)
        if kv_keep is not None:
            if None in attn.values():
                raise ValueError(f"block {i}: no q/k/v/o projections found; head removal supports Llama-style attention")
            h, kv, d = h0, kv0, d0
            r = h // kv
            group = head_scores[i].reshape(kv, r).sum(1)  # a KV group: its KV head and r query heads
            g = torch.sort(torch.argsort(group, descending=True)[:kv_keep]).values
            q_heads = (g.unsqueeze(1) * r + torch.arange(r)).reshape(-1)
            q_idx = (q_heads.unsqueeze(1) * d + torch.arange(d)).reshape(-1)
            kv_idx = (g.unsqueeze(1) * d + torch.arange(d)).reshape(-1)
            _keep_rows(attn["q"], q_idx)
            _keep_rows(attn["k"], kv_idx)
            _keep_rows(attn["v"], kv_idx)
            _keep_cols(attn["o"], q_idx)
            sa = b.self_attn
            for attr, v in (("num_heads", kv_keep * r), ("num_key_value_heads", kv_keep)):
                if hasattr(sa, attr):
                    setattr(sa, attr, v)
            out.setdefault("kept_kv_groups", []).append(g.tolist())
    if mlp_keep is not None:
        cfg.intermediate_size = mlp_keep
    if kv_keep is not None:
        cfg.head_dim = d0  # no longer hidden_size / heads
        cfg.num_attention_heads = kv_keep * (h0 // kv0)
        cfg.num_key_value_heads = kv_keep
    return out


# --- non-uniform per-block sparsity ---------------------------------------------------------

@torch.no_grad()
def owl_sparsities(model: nn.Module, tokens: torch.Tensor, sparsity: float, lam: float = 0.08, m: float = 5.0,
                   batch_size: int = 8, progress: bool = False) -> list[float]:
    """Outlier-weighed layerwise sparsity (OWL, Yin et al. 2023, arXiv:2310.05175): a block's
    outlier ratio is the share of its Wanda scores ``|W| * ||x||`` above ``m`` times their mean;
    ratios are mapped linearly to ``[-lam, lam]`` around the target, so blocks with more
    outliers are pruned less and the average stays ``sparsity``."""
    from llmpress.models import block_linears, linear_weight

    _, blocks = find_blocks(model)
    sq: dict[int, torch.Tensor] = {}
    hooks = []
    lins = [block_linears(b) for b in blocks]

    def pre(mod, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()  # [B*S, K]
        s = x.pow(2).sum(0)
        sq[id(mod)] = s if id(mod) not in sq else sq[id(mod)] + s

    for ls in lins:
        for mod in ls.values():
            hooks.append(mod.register_forward_pre_hook(pre))
    _forward_all(model, tokens, batch_size, hooks, "OWL outliers", progress)
    ratios = []
    for ls in lins:
        scores = torch.cat([(linear_weight(mod).detach().float().abs() * sq[id(mod)].sqrt().unsqueeze(0)).flatten()
                            for mod in ls.values() if id(mod) in sq])
        ratios.append(float((scores > scores.mean() * m).float().mean()))
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    r = (r - r.min()) / span * lam * 2 if span > 0 else torch.zeros_like(r)
    keep = r - r.mean() + (1 - sparsity)
    return [float(min(max(1 - k, 0.0), 0.99)) for k in keep]


# --- attention weight sharing -----------------------------------------------------------------

@torch.no_grad()
def merge_kv_heads(model: nn.Module, kv_heads: int) -> dict:
    """Convert multi-head (or grouped-query) attention to ``kv_heads`` key/value heads by
    mean-pooling the key and value projections of each group of adjacent KV heads (the
    conversion of Ainslie et al. 2023, arXiv:2305.13245, GQA). Query heads are unchanged; the
    KV cache shrinks by ``old / kv_heads``. In place; config.json follows."""
    cfg = model.config
    h, kv, d = _heads(cfg)
    if not 0 < kv_heads < kv or kv % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide the current {kv} key/value heads and be smaller; "
                         f"allowed: {[x for x in range(1, kv) if kv % x == 0]}")
    f = kv // kv_heads
    _, blocks = find_blocks(model)
    for i, b in enumerate(blocks):
        attn, _ = _block_parts(b)
        if None in attn.values():
            raise ValueError(f"block {i}: no q/k/v/o projections found; KV merging supports Llama-style attention")
        for k in ("k", "v"):
            lin = attn[k]
            w = lin.weight.detach().reshape(kv_heads, f, d, -1).mean(1).reshape(kv_heads * d, -1)
            lin.weight = nn.Parameter(w.clone(), requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.detach().reshape(kv_heads, f, d).mean(1).reshape(-1).clone(),
                                        requires_grad=False)
            lin.out_features = kv_heads * d
        sa = b.self_attn
        if hasattr(sa, "num_key_value_groups"):
            sa.num_key_value_groups = h // kv_heads
        if hasattr(sa, "num_key_value_heads"):
            sa.num_key_value_heads = kv_heads
    cfg.head_dim = d
    cfg.num_key_value_heads = kv_heads
    return {"kv_heads_before": kv, "kv_heads_after": kv_heads}


# --- recipe steps -----------------------------------------------------------------------------

def apply_model_step(model: nn.Module, st: DropBlocksStep | ShrinkStep, tokens: torch.Tensor | None,
                     batch_size: int = 8, progress: bool = False) -> dict:
    """Carry out a model-level recipe step (drop_blocks, shrink, merge_kv) in place; returns
    what was done, for the compression report."""
    import time

    from llmpress.recipe import RecipeError, ShrinkStep

    if isinstance(st, ShrinkStep) and st.method == "merge_kv":
        ts = time.perf_counter()
        try:
            info = merge_kv_heads(model, st.kv_heads)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        return dict(step=st.describe(), removed=[], seconds=time.perf_counter() - ts, **info)
    if isinstance(st, ShrinkStep):
        if tokens is None:
            raise ValueError(f"{st.describe()} measures channel importance on calibration data; pass calib=")
        cfg = model.config
        h, kv, _ = _heads(cfg)
        if st.kv_groups is not None and st.kv_groups >= kv:
            raise RecipeError(f"kv_groups={st.kv_groups} would remove all {kv} key/value head groups; at most {kv - 1}")
        inter = getattr(cfg, "intermediate_size", None)
        if st.mlp is not None and not isinstance(inter, int):
            raise RecipeError(f"{type(model).__name__} has no config.intermediate_size; MLP shrinking supports "
                              "Llama-style gated MLPs")
        ts = time.perf_counter()
        mlp_s, head_s = channel_scores(model, tokens, batch_size, progress)
        keep = None if st.mlp is None else max(1, round(inter * (1 - st.mlp)))
        info = shrink(model, keep, None if st.kv_groups is None else kv - st.kv_groups, mlp_s, head_s)
        return dict(step=st.describe(), removed=[], intermediate_size=getattr(cfg, "intermediate_size", None),
                    heads=(cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None)),
                    seconds=time.perf_counter() - ts, **info)

    n = len(find_blocks(model)[1])
    k = st.count(n)
    if st.importance != "last" and tokens is None:
        raise ValueError(f"{st.describe()} measures block importance on calibration data; pass calib=")
    ts = time.perf_counter()
    idx, info = choose_blocks(model, k, st.importance, tokens, batch_size, progress)
    drop_blocks(model, idx)
    return dict(step=st.describe(), removed=idx, blocks_before=n, blocks_after=n - k,
                seconds=time.perf_counter() - ts, **info)
