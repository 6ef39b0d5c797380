"""GGUF writer for llama.cpp: Llama-family (Llama, Mistral, SmolLM) and Qwen2 models.

The layout follows llama.cpp's ``convert_hf_to_gguf.py``: GGUF tensor names from the ``gguf``
package's name map, the query/key rows of Llama-architecture attention permuted to GGML's
rotary layout, 1-D tensors (norms, biases) in F32, every 2-D weight in the requested type
(token embeddings included; a tied ``lm_head`` is not written), rows that do not tile into the
type's blocks fall back to F16 (reported). The tokenizer is copied field by field from the GGUF
the model came from when there is one (the built-in assets), or built from the Hugging Face
``tokenizer.json`` (byte-level BPE, llama.cpp's ``gpt2`` tokenizer model) otherwise.

Compressed layers (``QuantLinear``, ``CodebookLinear``) are dequantized and rounded again onto
the GGML grid. Writes atomically (a temporary file renamed into place). Readers: llama.cpp,
``gguf.GGUFReader``, and transformers' GGUF loader (``llmpress.load("x.gguf")``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from llmpress.quant import ggml, kquants

log = logging.getLogger(__name__)

# transformers model_type -> GGUF architecture name
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# llama.cpp's general.file_type (enum llama_ftype) per requested type
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32,
             "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
             "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}  # as llama-quantize reads them
# a K-quant mix's base tensor type
_BASE = {"q2_k": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k", "q4_k_s": "q4_k",
         "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k"}
# a K-quant tensor whose rows do not tile into 256-value super-blocks (llama.cpp's tensor_type_fallback)
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


class GGUFExportError(ValueError):
    """The model or the request cannot be written as GGUF (architecture, type, tokenizer)."""


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(ftype: str, gname: str, ncols: int, n_layers: int, n_gqa: int, tied: bool) -> tuple[str, str | None]:
    """The GGML type llama.cpp's ``llama_tensor_get_type`` gives tensor ``gname`` (a GGUF name
    such as ``blk.3.attn_v.weight``) in K-quant mix ``ftype`` (Llama-family rules, dense
    models), after its fallback for rows that do not tile; returns (type, fallback note or None)."""
    base = _BASE[ftype]
    t = base
    parts = gname.split(".")
    i = int(parts[1]) if parts[0] == "blk" else -1
    kind = parts[2] if parts[0] == "blk" else parts[0]
    if kind == "output" or (tied and kind == "token_embd"):
        t = "q8_0" if ncols % 256 else "q6_k"
    elif kind == "attn_v":
        t = {"q2_k": "q4_k" if n_gqa >= 4 else "q3_k", "q3_k_m": "q5_k" if i < 2 else "q4_k", "q3_k_l": "q5_k",
             "q4_k_m": "q6_k" if _use_more_bits(i, n_layers) else base,
             "q5_k_m": "q6_k" if _use_more_bits(i, n_layers) else base,
             "q4_k_s": "q5_k" if i < 4 else base}.get(ftype, base)
    elif kind == "ffn_down":
        t = {"q2_k": "q3_k", "q3_k_m": "q5_k" if i < n_layers // 16 else "q4_k", "q3_k_l": "q5_k",
             "q4_k_m": "q6_k" if _use_more_bits(i, n_layers) else base,
             "q5_k_m": "q6_k" if _use_more_bits(i, n_layers) else base,
             "q4_k_s": "q5_k" if i < n_layers // 8 else base}.get(ftype, base)
    elif kind == "attn_output":
        t = {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ftype, base)
    if t in _FALLBACK and ncols % 256:
        fb = _FALLBACK[t]
        if ncols % 32:
            fb = "f16"
        return fb, f"{t} -> {fb} (row length {ncols})"
    return t, None


def _ggml_type(name: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16}.get(name) or getattr(gguf.GGMLQuantizationType, name.upper())


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half query/key rows -> GGML's interleaved pairs (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` under its Hugging Face name, compressed linears dequantized
    to float32; a tied ``lm_head`` left out."""
    from llmpress.nn import CompressedLinear

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        pre = f"{mname}." if mname else ""
        if isinstance(mod, CompressedLinear):
            out[f"{pre}weight"] = mod.weight.detach().float()
            if mod.bias is not None:
                out[f"{pre}bias"] = mod.bias.detach().float()
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights (lm_head = embed_tokens): written once
                continue
            seen.add(id(p))
            out[f"{pre}{pname}"] = p.detach().float()
    return out


def _permute_qweight(qw, n_head: int):
    """The rope row permutation applied to a solved integer weight (rows of qdata, scales, zeros)."""
    from dataclasses import replace

    if qw.scheme.group_axis != 1:
        return None
    rows = _permute_rope(torch.arange(qw.shape[0]), n_head)
    pick = (lambda v: v if v is None or v.numel() == 1 else v[rows])
    return replace(qw, qdata=qw.qdata[rows], scale=pick(qw.scale), zero=pick(qw.zero))


def _progress(total: int, on: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="GGUF tensors", unit="tensor", disable=not on)


def _source_gguf(model: nn.Module) -> Path | None:
    p = getattr(model, "llmpress_gguf_source", None)
    return Path(p) if p and Path(p).is_file() else None


def tokenizer_hints(model: nn.Module) -> dict:
    """What a rebuilt tokenizer cannot recover from tokenizer.json: llama.cpp's pre-tokenizer
    name, from the GGUF the model came from (kept with checkpoints saved by llmpress)."""
    src = _source_gguf(model)
    if src is not None:
        import gguf

        f = gguf.GGUFReader(src).fields.get("tokenizer.ggml.pre")
        return {"pre": f.contents()} if f is not None else {}
    return dict(getattr(model, "llmpress_gguf_tokenizer", None) or {})


def _copy_tokenizer(w, src: Path) -> None:
    import gguf

    r = gguf.GGUFReader(src)
    for key, f in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = f.types[0]
        val = f.contents()
        if main == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, val, main, sub_type=f.types[-1])
        else:
            w.add_key_value(key, val, main)


def _bpe_tokenizer(w, tok, vocab_size: int, pre: str | None = None) -> None:
    """llama.cpp's ``gpt2`` (byte-level BPE) tokenizer fields from a Hugging Face fast tokenizer."""
    import gguf

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizer.json) tokenizer or a source GGUF to copy it from")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer model {model.get('type')!r} is not supported for GGUF export yet "
                              "(byte-level BPE only); export from the source GGUF instead")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for t, i in vocab.items():
        tokens[i] = t
        a = added.get(t)
        types[i] = (gguf.TokenType.CONTROL if a and a.get("special") else gguf.TokenType.USER_DEFINED if a
                    else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or "default")
    if not pre:
        log.warning("GGUF tokenizer: pre-tokenizer type set to 'default' (llama.cpp identifies it by a hash "
                    "of sample tokenizations in its converter); check tokenization in llama.cpp")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id", None)
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(int(tid))
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rp.get("rope_type", rp.get("type", "default")) if isinstance(rp, dict) else "default"
    if kind not in ("default", None):
        raise GGUFExportError(f"rope scaling {kind!r} is not supported by the GGUF writer yet")
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def _encode(t: torch.Tensor, tt: str, imp: torch.Tensor | None, qw) -> tuple[torch.Tensor, str]:
    """Bytes of one 2-D tensor in GGML type ``tt`` and how they were made: a solved integer
    weight carried as is, K-quant search, importance-weighted search, or the reference rounding."""
    if qw is not None:
        b = ggml.carry(qw, tt)
        if b is not None:
            return b, "carried"
    if tt in kquants.SPECS:
        return kquants.quantize_rows(t, tt, imp), "weighted" if imp is not None else "search"
    if imp is not None and tt in kquants.LEGACY:
        return kquants.quantize_legacy_weighted(t, tt, imp), "weighted"
    return ggml.quantize_rows(t, tt), "reference"


def save_gguf(model: nn.Module, out: str | os.PathLike, qtype: str = "q8_0", *, overwrite: bool = False,
              name: str | None = None, imatrix: dict[str, torch.Tensor] | None = None,
              types: dict[str, str] | None = None, progress: bool = False) -> dict:
    """Write ``model`` as a GGUF file: 2-D weights in ``qtype`` (a single type, or a K-quant
    mix such as ``q4_k_m`` whose per-tensor types follow llama.cpp's rules); returns a summary
    (tensor types, fallbacks, how each was quantized, size).

    ``imatrix`` maps linear layer names (``model.layers.0.mlp.down_proj``; ``lm_head`` for the
    output, also used for tied embeddings) to the mean squared input of each column (see
    :func:`llmpress.calibrate.input_moments`); quantized types then minimise the error weighted
    by it. Weights already solved on an integer grid that fits the type (GPTQ, AWQ, RTN with one
    scale per 32 columns) keep their integers. ``types`` sets the GGML type of named linear layers
    (``{"model.layers.0.mlp.down_proj": "q6_k"}``, e.g. from :func:`llmpress.plan.gguf.plan_types`),
    over the mix's choice."""
    import gguf

    from llmpress.nn import QuantLinear

    qtype = ALIASES.get(qtype.lower(), qtype.lower())
    if qtype not in FILE_TYPE:
        raise GGUFExportError(f"GGUF type {qtype!r} is not supported; allowed: {sorted(FILE_TYPE)} "
                              f"(aliases {sorted(ALIASES)})")
    cfg = model.config
    arch = ARCHS.get(cfg.model_type)
    if arch is None:
        raise GGUFExportError(f"GGUF export supports {sorted(ARCHS)} models; got model_type {cfg.model_type!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    src = getattr(model, "llmpress_source", None)
    if src is not None and out.resolve() == Path(src).resolve():
        raise GGUFExportError(f"refusing to overwrite the input model {src}")

    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    n_blocks = cfg.num_hidden_layers
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, n_blocks)
    tensors = float_tensors(model)
    if getattr(cfg, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    summary: dict = {"file": str(out), "type": qtype, "tensors": {}, "fallback": {}}
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or getattr(cfg, "_name_or_path", "") or "llmpress model")
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(n_blocks))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(int(n_head))
        w.add_head_count_kv(int(n_kv))
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(int(cfg.vocab_size))
        w.add_rope_dimension_count(int(head_dim))
        if head_dim != cfg.hidden_size // n_head:
            w.add_key_length(int(head_dim))
            w.add_value_length(int(head_dim))
        w.add_file_type(FILE_TYPE[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        gsrc = _source_gguf(model)
        if gsrc is not None:
            _copy_tokenizer(w, gsrc)
        else:
            tok = getattr(model, "llmpress_tokenizer", None)
            if tok is None:
                raise GGUFExportError("the model has no tokenizer attached (model.llmpress_tokenizer)")
            _bpe_tokenizer(w, tok, int(cfg.vocab_size), tokenizer_hints(model).get("pre"))

        mods = dict(model.named_modules())
        tied = "lm_head.weight" not in tensors
        imatrix = imatrix or {}
        types = dict(types or {})
        todo = list(tensors.items())
        bar = _progress(len(todo), progress)
        for hf_name, t in todo:
            gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise GGUFExportError(f"no GGUF tensor name for {hf_name} ({arch})")
            perm = None
            if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                perm = n_head
            elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                perm = n_kv
            if perm is not None:
                t = _permute_rope(t, perm)
            mname = hf_name.rsplit(".", 1)[0]
            if t.dim() != 2:
                tt = "f32"
            elif mname in types and hf_name.endswith(".weight"):
                tt = types.pop(mname)
                if tt not in kquants.SPECS and tt not in ggml.BLOCK:
                    raise GGUFExportError(f"{mname}: GGML type {tt!r} is not supported; allowed: "
                                          f"{sorted(set(kquants.SPECS) | set(ggml.BLOCK))}")
                bs = kquants.QK_K if tt in kquants.SPECS else ggml.BLOCK[tt][0]
                if t.shape[-1] % bs:
                    raise GGUFExportError(f"{mname}: rows of {t.shape[-1]} do not tile into {tt} blocks of {bs}")
            elif qtype in _BASE:
                tt, note = mix_type(qtype, gname, t.shape[-1], n_blocks, n_head // n_kv, tied)
                if note:
                    summary["fallback"][gname] = note
            else:
                tt = qtype
                if tt not in ("f32", "f16", "bf16") and not ggml.fits(t.shape[-1], tt):
                    summary["fallback"][gname] = f"{tt} -> f16 (row length {t.shape[-1]})"
                    tt = "f16"
            if tt == "f32":
                w.add_tensor(gname, t.cpu().contiguous().numpy())
            elif tt == "f16":
                w.add_tensor(gname, t.to(torch.float16).cpu().contiguous().numpy())
            else:  # bytes [rows, row bytes]; the writer derives the element shape from the type
                imp = imatrix.get("lm_head" if tied and gname == "token_embd.weight" else mname)
                mod = mods.get(mname)
                qw = mod.qweight if isinstance(mod, QuantLinear) and hf_name.endswith(".weight") else None
                if qw is not None and perm is not None:
                    qw = _permute_qweight(qw, perm)
                data, how = _encode(t, tt, imp, qw)
                w.add_tensor(gname, data.numpy(), raw_dtype=_ggml_type(tt))
                summary.setdefault("method", {})[gname] = how
            summary["tensors"][gname] = tt
            bar.update(1)
        bar.close()
        if types:
            raise GGUFExportError(f"types= names layers the model does not have: {sorted(types)[:5]}")
        for g, why in summary["fallback"].items():
            log.warning("GGUF: %s stored as %s", g, why)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    summary["size_mb"] = out.stat().st_size / 1e6
    log.info("wrote %s (%s, %.1f MB)", out, qtype, summary["size_mb"])
    return summary
