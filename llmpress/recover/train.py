"""Recovery training: LoRA adapters on a frozen (compressed) model, trained by knowledge
distillation from the original model (forward or reverse KL on temperature-softened logits),
optionally plus the causal-LM loss. Checkpoints (adapter, optimizer, step) are safetensors +
JSON, written atomically every ``save_every`` steps; a run resumed from one reaches the same
result as an uninterrupted run (the batch order is a function of the step and the seed).
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

from llmpress.recover.lora import load_lora_state, lora_modules, lora_state

log = logging.getLogger(__name__)
KD_MODES = ("forward", "reverse", "none")


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

    def __post_init__(self) -> None:
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
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens (those where ``mask`` is True) of KL(teacher ‖ student) (forward) or
    KL(student ‖ teacher) (reverse) on logits softened by temperature ``t``, times t²
    (Hinton et al. 2015)."""
    s = F.log_softmax(student.float() / t, -1)
    q = F.log_softmax(teacher.float() / t, -1)
    if mode == "forward":
        kl = (q.exp() * (q - s)).sum(-1)
    else:
        kl = (s.exp() * (s - q)).sum(-1)
    if mask is not None:
        return (kl * mask).sum() / mask.sum().clamp(min=1) * t * t
    return kl.mean() * t * t


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


def _save_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, step: int, losses: list[float], d: Path,
                     cfg: RecoverConfig) -> None:
    from llmpress.formats.compressed_tensors import atomic_dir

    with atomic_dir(d, overwrite=True) as tmp:
        save_file(lora_state(model), str(tmp / "adapter_model.safetensors"))
        opt_t, steps = {}, {}
        for i, p in enumerate(opt.param_groups[0]["params"]):
            for k, v in opt.state.get(p, {}).items():
                if k == "step":
                    steps[str(i)] = float(v)
                else:
                    opt_t[f"{i}.{k}"] = v.detach().contiguous()
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "opt_steps": steps,
                                                    "config": asdict(cfg)}))


def _load_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, d: Path) -> tuple[int, list[float]]:
    state = json.loads((d / "state.json").read_text())
    load_lora_state(model, load_file(str(d / "adapter_model.safetensors")))
    ot = load_file(str(d / "optimizer.safetensors"))
    params = opt.param_groups[0]["params"]
    for i, p in enumerate(params):
        if str(i) in state["opt_steps"]:
            st = {"step": torch.tensor(state["opt_steps"][str(i)])}
            for k in ("exp_avg", "exp_avg_sq"):
                if f"{i}.{k}" in ot:
                    st[k] = ot[f"{i}.{k}"].to(p.device)
            opt.state[p] = st
    return int(state["step"]), list(state["losses"])


def recover(model: nn.Module, tokens: torch.Tensor, teacher: nn.Module | None = None,
            cfg: RecoverConfig = RecoverConfig(), checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = True, progress: bool = True, stop_after: int | None = None,
            loss_mask: torch.Tensor | None = None) -> RecoverReport:
    """Train the LoRA adapters of ``model`` (see :func:`~llmpress.recover.lora.add_lora`) on
    ``tokens`` [n, seqlen]; ``loss_mask`` [n, seqlen] (from :func:`llmpress.recover.data.pack`)
    keeps prompt tokens out of the loss. ``teacher`` (the original model) is needed unless ``cfg.kd`` is
    "none". ``stop_after`` ends the run early after that many steps (tests of resumption)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters: call llmpress.recover.add_lora(model) first")
    if cfg.kd != "none" and teacher is None:
        raise ValueError("knowledge distillation needs the teacher model (or kd='none' with ce_weight > 0)")
    if tokens.dim() != 2 or tokens.shape[0] < cfg.batch_size:
        raise ValueError(f"tokens must be [n >= batch_size, seqlen]; got {tuple(tokens.shape)}")
    if loss_mask is not None and loss_mask.shape != tokens.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must match tokens {tuple(tokens.shape)}")
    torch.manual_seed(cfg.seed)
    params = [p for m in mods.values() for p in (m.lora_A.weight, m.lora_B.weight)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_at = (lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))  # noqa: E731 - linear warm-up, then constant
    ck = Path(checkpoint_dir) if checkpoint_dir else None
    start, losses = 0, []
    if ck is not None and resume and (ck / "state.json").exists():
        start, losses = _load_checkpoint(model, opt, ck)
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
    model.train()
    if teacher is not None:
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
                g["lr"] = cfg.lr * lr_at(step)
            opt.zero_grad(set_to_none=True)
            tot = 0.0
            for micro in range(cfg.grad_accum):
                rows = _rows(tokens.shape[0], step, micro, cfg)
                ids = tokens[rows].to(dev)
                m = None if loss_mask is None else loss_mask[rows][:, 1:].to(dev)  # predicting token t from t-1
                out = model(input_ids=ids, use_cache=False)
                loss = torch.zeros((), device=dev)
                if cfg.kd != "none":
                    with torch.no_grad():
                        t_logits = teacher(input_ids=ids.to(next(teacher.parameters()).device), use_cache=False).logits
                    loss = loss + kd_loss(out.logits[:, :-1], t_logits[:, :-1].to(dev), cfg.temperature, cfg.kd, m)
                if cfg.ce_weight > 0:
                    labels = ids[:, 1:] if m is None else ids[:, 1:].masked_fill(~m, -100)
                    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
                    loss = loss + cfg.ce_weight * ce
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
                _save_checkpoint(model, opt, step + 1, losses, ck, cfg)
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
