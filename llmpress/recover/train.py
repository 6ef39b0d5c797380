"""Recovery training of a compressed model by knowledge distillation from the original model
(forward or reverse KL on temperature-softened logits, optionally hidden-state matching and the
causal-LM loss). What is trained depends on the model:

- LoRA adapters on a frozen compressed base (``add_lora``: LoRA / QLoRA);
- fake-quantized weights and optionally their scales (``add_qat``: quantization-aware training);
- every parameter (``train="full"``: distillation into a smaller dense student, e.g. a
  block-pruned one).

The teacher is a live model (any device) or a :class:`~llmpress.recover.cache.TeacherCache` of
its top-k logits written to disk beforehand. Checkpoints (trained tensors, optimizer, step) are
safetensors + JSON, written atomically every ``save_every`` steps; a run resumed from one reaches
the same result as an uninterrupted run (the batch order is a function of the step and the seed).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from llmpress.recover.cache import TeacherCache, _reduce, kd_loss_topk
from llmpress.recover.lora import lora_modules
from llmpress.recover.qat import qat_modules

log = logging.getLogger(__name__)
KD_MODES = ("forward", "reverse", "none")
TRAIN_MODES = ("auto", "lora", "qat", "full")
# default learning rates: LoRA adapters; QAT (grid steps per step for the integers, relative change
# for the log-scales before scale_lr_ratio); every weight of a dense student
DEFAULT_LR = {"lora": 1e-3, "qat": 1e-2, "full": 5e-5}


@dataclass
class RecoverConfig:
    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    temperature: float = 1.0
    kd: str = "forward"  # forward | reverse | none (causal-LM loss alone)
    ce_weight: float = 0.0  # weight of the causal-LM loss added to the KD loss
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = True
    save_every: int = 0
    seed: int = 0
    train: str = "auto"  # auto (LoRA if the model has adapters, else QAT layers) | lora | qat | full
    scale_lr_ratio: float = 0.3  # learning rate of QAT log-scales (learn_scales) relative to lr
    loss_chunk: int = 128  # tokens whose logits are computed at once (0: the whole sequence)
    hidden_weight: float = 0.0  # weight of hidden-state matching (normalised MSE per matched block)
    layer_map: list[int] | None = None  # teacher block matched to each student block (default: see layer_map)

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise ValueError(f"train={self.train!r}; allowed: {TRAIN_MODES}")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight={self.hidden_weight} must be >= 0")
        if self.kd not in KD_MODES:
            raise ValueError(f"kd={self.kd!r}; allowed: {KD_MODES}")
        if self.kd == "none" and self.ce_weight <= 0:
            raise ValueError("kd='none' needs ce_weight > 0 (otherwise there is no loss)")
        for k in ("steps", "batch_size", "grad_accum"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}={getattr(self, k)} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")


@dataclass
class RecoverReport:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    peak_rss_mb: float = 0.0
    resumed_from: int = 0


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, t: float = 1.0, mode: str = "forward",
            mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Mean (or with ``reduction="sum"`` the sum) over tokens (those where ``mask`` is True) of
    KL(teacher ‖ student) (forward) or KL(student ‖ teacher) (reverse) on logits softened by
    temperature ``t``, times t² (Hinton et al. 2015)."""
    s = F.log_softmax(student.float() / t, -1)
    q = F.log_softmax(teacher.float() / t, -1)
    if mode == "forward":
        kl = (q.exp() * (q - s)).sum(-1)
    else:
        kl = (s.exp() * (s - q)).sum(-1)
    return _reduce(kl, mask, reduction) * t * t


def _rows(n: int, step: int, micro: int, cfg: RecoverConfig) -> torch.Tensor:
    """Row indices for (step, micro-batch): a seeded permutation per epoch, so any step is
    reproducible."""
    per_step = cfg.batch_size * cfg.grad_accum
    start = (step * per_step + micro * cfg.batch_size)
    epoch, off = divmod(start, n)
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g)
    idx = torch.cat([perm, torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch + 1))])
    return idx[off: off + cfg.batch_size]


def trainable_parameters(model: nn.Module, mode: str = "auto") -> dict[str, nn.Parameter]:
    """The parameters recovery trains, by name: LoRA adapters, QAT weights (and scales when
    learned), or every floating-point parameter (``mode="full"``)."""
    lora, qat = lora_modules(model), qat_modules(model)
    if mode == "auto":
        mode = "lora" if lora else "qat" if qat else ""
    if mode == "lora" and lora:
        keep = {id(p) for m in lora.values() for p in (m.lora_A.weight, m.lora_B.weight)}
    elif mode == "qat" and qat:
        keep = {id(p) for m in qat.values() for p in m.trainable()}
    elif mode == "full":
        keep = {id(p) for p in model.parameters() if p.is_floating_point()}
    else:
        raise ValueError("nothing to train: call llmpress.recover.add_lora(model) (LoRA / QLoRA) or "
                         "llmpress.recover.add_qat(model) (quantization-aware training) first, or pass "
                         "train='full' to train every weight of a dense student"
                         + (f" (train={mode!r} asked for, but the model has none)" if mode else ""))
    return {n: p for n, p in model.named_parameters() if id(p) in keep}


def layer_map(student: nn.Module, teacher: nn.Module, cfg: RecoverConfig) -> list[int]:
    """The teacher block whose output each student block's output is matched to: ``cfg.layer_map``;
    else the blocks ``drop_blocks`` kept (recorded in the config); else the same index when the
    depths agree; else evenly spaced."""
    from llmpress.models import find_blocks

    ns, nt = len(find_blocks(student)[1]), len(find_blocks(teacher)[1])
    m = cfg.layer_map or getattr(student.config, "llmpress_kept_blocks", None)
    if m is None:
        m = list(range(ns)) if ns == nt else [round((j + 1) * nt / ns) - 1 for j in range(ns)]
    m = [int(v) for v in m]
    if len(m) != ns or any(not 0 <= v < nt for v in m) or m != sorted(m):
        raise ValueError(f"layer_map {m} must give, for each of the student's {ns} blocks, an increasing "
                         f"teacher block index in [0, {nt})")
    return m


def hidden_loss(hs: tuple[torch.Tensor, ...], ht: tuple[torch.Tensor, ...], lmap: list[int]) -> torch.Tensor:
    """Mean over matched blocks of ||h_s - h_t||² / ||h_t||² on the residual stream after each
    student block (hidden_states[j + 1]). The last block is left out: transformers returns it
    after the final norm, and the logits term covers it."""
    terms = []
    for j in range(len(lmap) - 1):
        a, b = hs[j + 1].float(), ht[lmap[j] + 1].float().to(hs[j + 1].device)
        terms.append((a - b).pow(2).mean() / b.pow(2).mean().clamp(min=1e-12))
    return torch.stack(terms).mean() if terms else hs[0].new_zeros((), dtype=torch.float32)


def _opt_params(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


def _save_checkpoint(params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, step: int, losses: list[float],
                     d: Path, cfg: RecoverConfig) -> None:
    from llmpress.formats.compressed_tensors import atomic_dir

    with atomic_dir(d, overwrite=True) as tmp:
        save_file({n: p.detach().contiguous() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
        opt_t, steps = {}, {}
        for i, p in enumerate(_opt_params(opt)):
            for k, v in opt.state.get(p, {}).items():
                if k == "step":
                    steps[str(i)] = float(v)
                else:
                    opt_t[f"{i}.{k}"] = v.detach().contiguous()
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "opt_steps": steps,
                                                    "config": asdict(cfg)}))


def _load_checkpoint(params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, d: Path) -> tuple[int, list[float]]:
    state = json.loads((d / "state.json").read_text())
    saved = load_file(str(d / "trainable.safetensors"))
    if set(saved) != set(params):
        raise ValueError(f"checkpoint {d} holds other tensors than this run trains "
                         f"({len(saved)} vs {len(params)}); use a fresh --checkpoint directory")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    ot = load_file(str(d / "optimizer.safetensors"))
    for i, p in enumerate(_opt_params(opt)):
        if str(i) in state["opt_steps"]:
            st = {"step": torch.tensor(state["opt_steps"][str(i)])}
            for k in ("exp_avg", "exp_avg_sq"):
                if f"{i}.{k}" in ot:
                    st[k] = ot[f"{i}.{k}"].to(p.device)
            opt.state[p] = st
    return int(state["step"]), list(state["losses"])


def _head_split(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, head) of a causal LM whose logits are exactly head(decoder(ids).last_hidden_state),
    checked on a few tokens (models that scale or soft-cap their logits fail the check); None
    otherwise. It lets the loss compute the logits a chunk of tokens at a time."""
    try:
        dec, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if dec is None or head is None or dec is model:
        return None
    dev = next(model.parameters()).device
    ids = torch.arange(3, 19, device=dev).unsqueeze(0) % getattr(model.config, "vocab_size", 16)
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, inp, out):
        seen["h"], seen["o"] = inp[0].detach(), out.detach()

    h = head.register_forward_hook(hook)
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits.float()
            hid = dec(input_ids=ids, use_cache=False).last_hidden_state.float()
    except Exception as e:  # noqa: BLE001 - any failure means: use the plain path
        log.debug("no decoder/head split (%s); the logits are computed whole", e)
        return None
    finally:
        h.remove()
    # the logits must be the head's output as is (no scaling / soft-capping after it) and the
    # decoder's output must be what the head reads (compared loosely: half-precision kernels
    # may round differently between two calls)
    ok = ("o" in seen and seen["o"].shape == ref.shape and hid.shape == seen["h"].shape
          and bool(torch.allclose(seen["o"].float(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max())))
          and float(F.cosine_similarity(hid.flatten(), seen["h"].float().flatten(), dim=0)) > 0.99)
    if not ok:
        log.info("the logits are not head(decoder(x)) for this model; they are computed whole")
    return (dec, head) if ok else None


def _micro_loss(model: nn.Module, split_s, teacher, split_t, ids: torch.Tensor, rows: torch.Tensor,
                m: torch.Tensor | None, cfg: RecoverConfig, lmap: list[int] | None) -> torch.Tensor:
    """The loss of one micro-batch. With a decoder/head split the student's logits (and the
    live teacher's) are computed ``cfg.loss_chunk`` tokens at a time inside an activation
    checkpoint, so the [batch, seq, vocab] tensors of the whole sequence never exist at once."""
    dev = ids.device
    hid = cfg.hidden_weight > 0
    kd = cfg.kd != "none"
    cached = isinstance(teacher, TeacherCache)
    so = (split_s[0] if split_s else model)(input_ids=ids, use_cache=False, output_hidden_states=hid)
    src, head = (so.last_hidden_state, split_s[1]) if split_s else (so.logits, None)
    t_src = t_head = to = vals = idx = lse = None
    if cached and kd:
        vals, idx, lse = (x.to(dev) for x in teacher.get(rows))
    elif teacher is not None and (kd or hid):
        with torch.no_grad():
            tdev = next(teacher.parameters()).device
            to = (split_t[0] if split_t else teacher)(input_ids=ids.to(tdev), use_cache=False, output_hidden_states=hid)
            t_src, t_head = (to.last_hidden_state, split_t[1]) if split_t else (to.logits, None)
    n = ids.shape[1] - 1
    labels = None
    if cfg.ce_weight > 0:
        labels = ids[:, 1:] if m is None else ids[:, 1:].masked_fill(~m, -100)

    def chunk(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        logits = head(x) if head is not None else x
        mm = None if m is None else m[:, a:b]
        out = logits.new_zeros((), dtype=torch.float32)
        if kd and cached:
            out = out + kd_loss_topk(logits, vals[:, a:b], idx[:, a:b], lse[:, a:b], cfg.temperature, cfg.kd, mm,
                                     reduction="sum")
        elif kd:
            with torch.no_grad():
                tl = t_head(t_src[:, a:b]) if t_head is not None else t_src[:, a:b]
            out = out + kd_loss(logits, tl.to(dev), cfg.temperature, cfg.kd, mm, reduction="sum")
        if labels is not None:
            out = out + cfg.ce_weight * F.cross_entropy(logits.flatten(0, 1).float(), labels[:, a:b].flatten(),
                                                        ignore_index=-100, reduction="sum")
        return out

    step = cfg.loss_chunk if head is not None and 0 < cfg.loss_chunk < n else n
    total = src.new_zeros((), dtype=torch.float32)
    for a in range(0, n, step):
        b = min(a + step, n)
        if step < n:
            total = total + torch.utils.checkpoint.checkpoint(chunk, src[:, a:b], a, b, use_reentrant=False)
        else:
            total = total + chunk(src[:, a:b], a, b)
    loss = total / (m.sum().clamp(min=1) if m is not None else ids.shape[0] * n)
    if hid:
        loss = loss + cfg.hidden_weight * hidden_loss(so.hidden_states, to.hidden_states, lmap)
    return loss


def recover(model: nn.Module, tokens: torch.Tensor, teacher: nn.Module | TeacherCache | None = None,
            cfg: RecoverConfig = RecoverConfig(), checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = True, progress: bool = True, stop_after: int | None = None,
            loss_mask: torch.Tensor | None = None) -> RecoverReport:
    """Train ``model`` (its LoRA adapters, QAT layers, or all of it: see
    :func:`trainable_parameters`) on ``tokens`` [n, seqlen]; ``loss_mask`` [n, seqlen] (from
    :func:`llmpress.recover.data.pack`) keeps prompt tokens out of the loss. ``teacher`` (the
    original model, or a TeacherCache built on these same ``tokens``) is needed unless ``cfg.kd``
    is "none". ``stop_after`` ends the run early after that many steps (tests of resumption)."""
    named = trainable_parameters(model, cfg.train)
    if cfg.kd != "none" and teacher is None:
        raise ValueError("knowledge distillation needs the teacher model (or kd='none' with ce_weight > 0)")
    cached = isinstance(teacher, TeacherCache)
    if cached:
        teacher.check(tokens, cfg.temperature)
        if cfg.hidden_weight > 0:
            raise ValueError("hidden-state matching needs the live teacher (a logit cache has no hidden states)")
    if cfg.hidden_weight > 0 and teacher is None:
        raise ValueError("hidden-state matching needs the teacher model")
    if tokens.dim() != 2 or tokens.shape[0] < cfg.batch_size:
        raise ValueError(f"tokens must be [n >= batch_size, seqlen]; got {tuple(tokens.shape)}")
    if loss_mask is not None and loss_mask.shape != tokens.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must match tokens {tuple(tokens.shape)}")
    torch.manual_seed(cfg.seed)
    params = list(named.values())
    lmap = layer_map(model, teacher, cfg) if cfg.hidden_weight > 0 else None
    for p in params:
        p.requires_grad_(True)
    scales = {id(m.log_scale) for m in qat_modules(model).values()}
    groups = [{"params": [p for p in params if id(p) not in scales], "scale": 1.0},
              {"params": [p for p in params if id(p) in scales], "scale": cfg.scale_lr_ratio}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_at = (lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))  # noqa: E731 - linear warm-up, then constant
    ck = Path(checkpoint_dir) if checkpoint_dir else None
    start, losses = 0, []
    if ck is not None and resume and (ck / "state.json").exists():
        start, losses = _load_checkpoint(named, opt, ck)
        log.info("resuming from %s at step %d", ck, start)
    dev = params[0].device
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        ckpt_on = lambda: model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})  # noqa: E731
        ckpt_off = model.activation_checkpointing_disable
    elif hasattr(model, "gradient_checkpointing_enable"):
        ckpt_on = lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # noqa: E731
        ckpt_off = model.gradient_checkpointing_disable
    else:
        ckpt_on = ckpt_off = None
    if cfg.grad_checkpointing and ckpt_on is not None:
        ckpt_on()
    model.eval()
    split_s = _head_split(model) if cfg.loss_chunk else None
    split_t = _head_split(teacher) if cfg.loss_chunk and teacher is not None and not cached else None
    model.train()
    if teacher is not None and not cached:
        teacher.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="recover", unit="step")
    t0 = time.perf_counter()
    n_tok = 0
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    try:
        for step in range(start, end):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * g["scale"] * lr_at(step)
            opt.zero_grad(set_to_none=True)
            tot = 0.0
            for micro in range(cfg.grad_accum):
                rows = _rows(tokens.shape[0], step, micro, cfg)
                ids = tokens[rows].to(dev)
                m = None if loss_mask is None else loss_mask[rows][:, 1:].to(dev)  # predicting token t from t-1
                loss = _micro_loss(model, split_s, teacher, split_t, ids, rows, m, cfg, lmap)
                (loss / cfg.grad_accum).backward()
                tot += float(loss.detach()) / cfg.grad_accum
                n_tok += ids.numel()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            losses.append(tot)
            if not torch.isfinite(torch.tensor(tot)):
                raise FloatingPointError(f"recovery loss became {tot} at step {step}; lower the learning rate")
            if bar is not None:
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{tot:.4f}", tok_s=f"{n_tok / el:.0f}")
                bar.update(1)
            if ck is not None and cfg.save_every and (step + 1) % cfg.save_every == 0:
                _save_checkpoint(named, opt, step + 1, losses, ck, cfg)
    finally:
        if bar is not None:
            bar.close()
        model.eval()
        if cfg.grad_checkpointing and ckpt_off is not None:
            ckpt_off()
        for p in params:
            p.requires_grad_(False)
    el = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return RecoverReport(steps=len(losses), losses=losses, seconds=el, tokens_per_s=n_tok / max(el, 1e-9),
                         peak_rss_mb=rss, resumed_from=start)
