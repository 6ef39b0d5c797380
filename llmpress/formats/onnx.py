"""ONNX export of Llama-family causal LMs (Llama, Mistral, Qwen2) with a KV cache, for onnxruntime.

The graph is written op by op with ``onnx.helper`` (opset 17, plus onnxruntime's
``com.microsoft.MatMulNBits`` for 4-bit weights), with the input / output names optimum and
onnxruntime-genai use:

- inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq] (1 = attend),
  ``position_ids`` [batch, seq], ``past_key_values.{i}.key|value`` [batch, kv_heads, past, head_dim];
- outputs ``logits`` [batch, seq, vocab], ``present.{i}.key|value`` [batch, kv_heads, past + seq, head_dim].

Attention is causal over the cache plus the mask; grouped-query heads attend their shared
key/value head through broadcasting (no copies). Rotary tables come from the model's own rotary
module (so its scaling type is honoured) as initializers.

Weights (``weights=``):

- ``"float32"``: every linear as a float32 ``MatMul``.
- ``"int4"``: every block linear as ``MatMulNBits`` (4-bit, blocks of a power of two). A layer
  already on a 4-bit integer grid (GPTQ, AWQ, RTN; groups along the input) keeps its integers and
  scales; a float layer is rounded (asymmetric, blocks of 32, min/max). The embedding table is
  int8 per row (gathered, then scaled) and a tied output head reuses it through ``Gemm``; an
  untied head is int8 per row as well. Layers whose width does not divide stay float32 (reported).

Written atomically into a directory: ``model.onnx`` (weights as external data next to it when
over 1.5 GB), ``config.json``, tokenizer files and a model card ``README.md``. :class:`OnnxLM`
runs it (greedy generation with the cache).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

ARCHS = ("llama", "mistral", "qwen2")
WEIGHTS = ("float32", "int4")
_NEG = float(np.finfo(np.float32).min)


class ONNXExportError(ValueError):
    """The model or the request cannot be written as ONNX."""


class _Graph:
    def __init__(self) -> None:
        from onnx import helper

        self.h = helper
        self.nodes: list = []
        self.inits: list = []
        self.k = 0
        self.bytes = 0

    def _name(self, p: str) -> str:
        self.k += 1
        return f"{p}_{self.k}"

    def op(self, op: str, inputs: list[str], n_out: int = 1, domain: str | None = None, **attrs):
        outs = [self._name(op.lower()) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op, inputs, outs, name=self._name(op), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, a: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        self.bytes += a.nbytes
        return name

    def const(self, v, dtype=np.int64) -> str:
        return self.init(self._name("const"), np.array(v, dtype=dtype))


def _pow2_block(gs: int) -> int | None:
    """Largest power of two in [16, 128] dividing the group size (MatMulNBits' block sizes)."""
    for b in (128, 64, 32, 16):
        if gs % b == 0:
            return b
    return None


def _nbits_from_qweight(qw) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int] | None:
    """A 4-bit integer weight as MatMulNBits tensors (packed B, scales, packed zero points,
    block size), keeping its integers; None where its grid does not map."""
    s = qw.scheme
    if s.type != "int" or s.bits != 4 or s.group_axis != 1 or s.strategy not in ("group", "channel"):
        return None
    if qw.zero is not None and qw.zero.is_floating_point():
        return None
    n, k = qw.shape
    gs = k if s.strategy == "channel" else s.group_size
    bs = _pow2_block(gs)
    if bs is None:
        return None
    rep = gs // bs
    q = (qw.qdata.to(torch.int32).cpu() + 8).reshape(n, k // bs, bs)  # unsigned 0..15
    scale = qw.scale.float().cpu().reshape(n, -1).repeat_interleave(rep, 1)  # [N, K / bs]
    zp = None if qw.zero is None else (qw.zero.to(torch.int32).cpu().reshape(n, -1) + 8).repeat_interleave(rep, 1)
    return _pack_nbits(q, scale, zp, bs)


def _pack_nbits(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, bs: int):
    n, nb, _ = q.shape
    b = (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8).numpy()  # [N, blocks, bs / 2]
    zpk = None
    if zp is not None:
        if nb % 2:
            zp = torch.cat([zp, torch.full((n, 1), 8, dtype=zp.dtype)], 1)
        zpk = (zp[:, 0::2] | (zp[:, 1::2] << 4)).to(torch.uint8).reshape(-1).numpy()
    return b, scale.reshape(-1).numpy().astype(np.float32), zpk, bs


def _nbits_from_float(w: torch.Tensor, bs: int = 32):
    """Round a float weight [N, K] to 4 bits, asymmetric, blocks of ``bs`` (min / max)."""
    n, k = w.shape
    x = w.float().cpu().reshape(n, k // bs, bs)
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zp = torch.round(-lo / scale).clamp(0, 15).to(torch.int32)
    q = torch.round(x / scale.unsqueeze(-1) + zp.unsqueeze(-1)).clamp(0, 15).to(torch.int32)
    return _pack_nbits(q, scale, zp, bs)


def _int8_rows(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: (int8 [R, C], scale [R])."""
    w = w.detach().float().cpu()
    s = (w.abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8).numpy(), s.numpy()


class _Builder:
    def __init__(self, model: nn.Module, weights: str, max_length: int, embeddings: str) -> None:
        self.m, self.cfg, self.weights = model, model.config, weights
        self.int8_tables = weights == "int4" and embeddings == "int8"
        self.g = _Graph()
        self.notes: dict[str, str] = {}
        self.max_length = max_length

    # ---- pieces
    def linear(self, x: str, mod: nn.Module, name: str) -> str:
        from llmpress.models import linear_weight
        from llmpress.nn import QuantLinear

        g = self.g
        out = None
        if self.weights == "int4":
            packed = _nbits_from_qweight(mod.qweight) if isinstance(mod, QuantLinear) else None
            if packed is None:
                w = linear_weight(mod).detach()
                if isinstance(mod, QuantLinear):
                    self.notes[name] = f"{mod.scheme.describe()} does not map to 4-bit blocks: re-rounded"
                if w.shape[1] % 32 == 0:
                    packed = _nbits_from_float(w)
                else:
                    self.notes[name] = f"in_features {w.shape[1]} not a multiple of 32: float32"
            if packed is not None:
                b, sc, zp, bs = packed
                n, k = linear_weight(mod).shape
                ins = [x, g.init(f"{name}.qweight", b), g.init(f"{name}.scales", sc)]
                if zp is not None:
                    ins.append(g.init(f"{name}.qzeros", zp))
                out = g.op("MatMulNBits", ins, domain="com.microsoft", K=k, N=n, bits=4, block_size=bs)
        if out is None:
            w = linear_weight(mod).detach().float().cpu().t().contiguous().numpy()
            out = g.op("MatMul", [x, g.init(f"{name}.weight_t", w)])
        if getattr(mod, "bias", None) is not None:
            out = g.op("Add", [out, g.init(f"{name}.bias", mod.bias.detach().float().cpu().numpy())])
        return out

    def rmsnorm(self, x: str, mod: nn.Module, name: str) -> str:
        g = self.g
        eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6)))
        ms = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), g.init(f"{name}.weight", mod.weight.detach().float().cpu().numpy())])

    def rotate(self, x: str, cos: str, sin: str, half: int) -> str:
        g = self.g
        x1, x2 = g.op("Split", [x, g.const([half, half])], n_out=2, axis=-1)
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])

    # ---- the model
    def build(self):
        from onnx import TensorProto

        g, cfg, m = self.g, self.cfg, self.m
        h = g.h
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
        rep = nh // nkv
        L = cfg.num_hidden_layers
        inputs = [h.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                  h.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
                  h.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
        outputs = [h.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])]
        for i in range(L):
            for kv in ("key", "value"):
                inputs.append(h.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT,
                                                       ["batch", nkv, "past", hd]))
                outputs.append(h.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT,
                                                        ["batch", nkv, "total", hd]))

        # embeddings
        emb = m.get_input_embeddings().weight.detach()
        if self.int8_tables:
            table, tscale = _int8_rows(emb)
            g.init("embed.int8", table)
            g.init("embed.scale", tscale)
            rows = g.op("Cast", [g.op("Gather", ["embed.int8", "input_ids"])], to=TensorProto.FLOAT)
            x = g.op("Mul", [rows, g.op("Unsqueeze", [g.op("Gather", ["embed.scale", "input_ids"]), g.const([-1])])])
        else:
            g.init("embed.weight", emb.float().cpu().numpy())
            x = g.op("Gather", ["embed.weight", "input_ids"])

        # rotary tables [max_len, hd] from the model's own rotary module
        rot = getattr(m.model, "rotary_emb", None)
        if rot is None:
            raise ONNXExportError("the model has no rotary embedding module (model.model.rotary_emb)")
        with torch.no_grad():
            pos = torch.arange(self.max_length)[None]
            cos, sin = rot(torch.zeros(1, 1, hd, dtype=torch.float32), pos)
        g.init("rope.cos", cos[0].float().cpu().numpy())
        g.init("rope.sin", sin[0].float().cpu().numpy())
        cos4 = g.op("Unsqueeze", [g.op("Gather", ["rope.cos", "position_ids"]), g.const([1])])  # [B, 1, S, hd]
        sin4 = g.op("Unsqueeze", [g.op("Gather", ["rope.sin", "position_ids"]), g.const([1])])
        cos5 = g.op("Unsqueeze", [cos4, g.const([1])])  # [B, 1, 1, S, hd]
        sin5 = g.op("Unsqueeze", [sin4, g.const([1])])

        # mask [B, 1, 1, S, T]: causal over past + current, and attention_mask
        s_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0)
        t_len = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)
        past = g.op("Sub", [t_len, s_len])
        qpos = g.op("Range", [past, t_len, g.const(1)])
        kpos = g.op("Range", [g.const(0), t_len, g.const(1)])
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [kpos, g.const([0])]), g.op("Unsqueeze", [qpos, g.const([1])])])
        am = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), g.const([1, 2, 3])])
        mask = g.op("Where", [g.op("And", [causal, am]), g.const(0.0, np.float32), g.const(_NEG, np.float32)])
        scale = g.const(1.0 / float(hd) ** 0.5, np.float32)

        for i, layer in enumerate(m.model.layers):
            p = f"layers.{i}"
            at, mlp = layer.self_attn, layer.mlp
            hs = self.rmsnorm(x, layer.input_layernorm, f"{p}.input_layernorm")
            q = self.linear(hs, at.q_proj, f"{p}.q_proj")
            k = self.linear(hs, at.k_proj, f"{p}.k_proj")
            v = self.linear(hs, at.v_proj, f"{p}.v_proj")
            q = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, nkv, rep, hd])])], perm=[0, 2, 3, 1, 4])
            k = g.op("Transpose", [g.op("Reshape", [k, g.const([0, 0, nkv, hd])])], perm=[0, 2, 1, 3])
            v = g.op("Transpose", [g.op("Reshape", [v, g.const([0, 0, nkv, hd])])], perm=[0, 2, 1, 3])
            q = self.rotate(q, cos5, sin5, hd // 2)  # [B, kv, rep, S, hd]
            k = self.rotate(k, cos4, sin4, hd // 2)  # [B, kv, S, hd]
            g.nodes.append(h.make_node("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], axis=2,
                                       name=f"concat_k_{i}"))
            g.nodes.append(h.make_node("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], axis=2,
                                       name=f"concat_v_{i}"))
            kt = g.op("Transpose", [g.op("Unsqueeze", [f"present.{i}.key", g.const([2])])], perm=[0, 1, 2, 4, 3])
            s = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, kt]), scale]), mask])  # [B, kv, rep, S, T]
            pr = g.op("Softmax", [s], axis=-1)
            o = g.op("MatMul", [pr, g.op("Unsqueeze", [f"present.{i}.value", g.const([2])])])  # [B, kv, rep, S, hd]
            o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 3, 1, 2, 4]), g.const([0, 0, nh * hd])])
            x = g.op("Add", [x, self.linear(o, at.o_proj, f"{p}.o_proj")])
            hs = self.rmsnorm(x, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
            gate = self.linear(hs, mlp.gate_proj, f"{p}.gate_proj")
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
            up = self.linear(hs, mlp.up_proj, f"{p}.up_proj")
            x = g.op("Add", [x, self.linear(g.op("Mul", [act, up]), mlp.down_proj, f"{p}.down_proj")])

        x = self.rmsnorm(x, m.model.norm, "norm")
        head = m.get_output_embeddings()
        tied = head is not None and head.weight is m.get_input_embeddings().weight
        x2 = g.op("Reshape", [x, g.const([-1, cfg.hidden_size])])
        if self.int8_tables:
            if tied:
                tab, sc = "embed.int8", "embed.scale"
            else:
                t8, s8 = _int8_rows(head.weight)
                tab, sc = g.init("lm_head.int8", t8), g.init("lm_head.scale", s8)
            wdq = g.op("DequantizeLinear", [tab, sc], axis=0)
            flat = g.op("Gemm", [x2, wdq], transB=1)
        else:
            wname = "embed.weight" if tied else g.init("lm_head.weight", head.weight.detach().float().cpu().numpy())
            flat = g.op("Gemm", [x2, wname], transB=1)
        if getattr(head, "bias", None) is not None:
            flat = g.op("Add", [flat, g.init("lm_head.bias", head.bias.detach().float().cpu().numpy())])
        shape = g.op("Concat", [g.op("Shape", ["input_ids"]), g.const([cfg.vocab_size])], axis=0)
        g.nodes.append(h.make_node("Reshape", [flat, shape], ["logits"], name="logits_reshape"))
        graph = h.make_graph(g.nodes, "llmpress", inputs, outputs, initializer=g.inits)
        opsets = [h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]
        return h.make_model(graph, opset_imports=opsets, producer_name="llmpress", ir_version=8)


def save_onnx(model: nn.Module, out: str | os.PathLike, weights: str = "float32", *, overwrite: bool = False,
              max_length: int | None = None, embeddings: str = "int8") -> dict:
    """Write ``model`` as an ONNX directory (see the module docstring); returns a summary.
    ``embeddings``: with int4 weights, the embedding table and output head as ``"int8"`` (per
    row, the default) or ``"float32"``; ``max_length``: rows of the rotary tables (default the
    model's context, at most 32768)."""
    import onnx

    from llmpress.formats.compressed_tensors import replace_dir

    if weights not in WEIGHTS:
        raise ONNXExportError(f"ONNX weights {weights!r} are not supported; allowed: {list(WEIGHTS)}")
    if embeddings not in ("int8", "float32"):
        raise ONNXExportError(f"embeddings={embeddings!r}; allowed: int8, float32")
    cfg = model.config
    if cfg.model_type not in ARCHS:
        raise ONNXExportError(f"ONNX export supports {list(ARCHS)} models; got model_type {cfg.model_type!r}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ONNXExportError(f"ONNX export supports SiLU MLPs; got hidden_act {cfg.hidden_act!r}")
    from llmpress.nn import CompressedLinear, QuantLinear

    for n, mod in model.named_modules():
        if isinstance(mod, CompressedLinear) and not isinstance(mod, QuantLinear) and weights == "int4":
            log.info("%s (%s) is dequantized and rounded to 4 bits", n, type(mod).__name__)
        if isinstance(mod, QuantLinear) and mod.act is not None:
            raise ONNXExportError(f"{n}: activation quantization ({mod.describe()}) is not exported to ONNX yet")
    out = Path(out)
    src = getattr(model, "llmpress_source", None)
    if src is not None and out.resolve() == Path(src).resolve():
        raise ONNXExportError(f"refusing to overwrite the input model {src}")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    max_length = int(max_length or min(int(cfg.max_position_embeddings), 32768))
    b = _Builder(model, weights, max_length, embeddings)
    proto = b.build()
    tmp = out.parent / f".{out.name}.llmpress-tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        big = b.g.bytes > 1.5e9
        onnx.save_model(proto, str(tmp / "model.onnx"), save_as_external_data=big, all_tensors_to_one_file=True,
                        location="model.onnx.data")
        cfg.save_pretrained(tmp)
        tok = getattr(model, "llmpress_tokenizer", None)
        if tok is not None:
            tok.save_pretrained(tmp)
        summary = {"file": str(out / "model.onnx"), "type": f"onnx:{weights}", "weights": weights,
                   "embeddings": embeddings if weights == "int4" else "float32",
                   "notes": b.notes, "opset": 17, "max_length": max_length,
                   "size_mb": sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith("model.onnx")) / 1e6}
        (tmp / "llmpress_onnx.json").write_text(json.dumps(summary, indent=2))
        from llmpress.formats.card import model_card

        details = [f"weights: {weights}" + (f" (4-bit MatMulNBits; {summary['embeddings']} embedding / head)"
                                            if weights == "int4" else ""),
                   f"size: {summary['size_mb']:.1f} MB", f"max length (rotary table): {max_length}"]
        details += [f"{k}: {v}" for k, v in b.notes.items()]
        (tmp / "README.md").write_text(model_card(model, f"onnx:{weights}", details=details))
        replace_dir(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for n, why in b.notes.items():
        log.warning("ONNX: %s: %s", n, why)
    log.info("wrote %s (%s, %.1f MB)", out, weights, summary["size_mb"])
    return summary


class OnnxLM:
    """Run an exported directory with onnxruntime: logits and greedy generation with the cache."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        p = Path(path)
        p = p / "model.onnx" if p.is_dir() else p
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]

    def forward(self, ids: np.ndarray, cache: dict | None = None) -> tuple[np.ndarray, dict]:
        ids = np.asarray(ids, dtype=np.int64)
        b, s = ids.shape
        p = 0 if cache is None else next(iter(cache.values())).shape[2]
        feed = {"input_ids": ids, "attention_mask": np.ones((b, p + s), np.int64),
                "position_ids": np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy()}
        for i in self.past:
            feed[i.name] = cache[i.name] if cache else np.zeros((b, i.shape[1], 0, i.shape[3]), np.float32)
        outs = self.sess.run(None, feed)
        names = [o.name for o in self.sess.get_outputs()]
        new = {n.replace("present.", "past_key_values."): v for n, v in zip(names, outs) if n.startswith("present.")}
        return outs[names.index("logits")], new

    def logits(self, ids) -> np.ndarray:
        return self.forward(np.asarray(ids))[0]

    def generate(self, ids, max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt (token ids), one cached step per token."""
        logits, cache = self.forward(np.asarray([list(ids)]))
        out = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits, cache = self.forward(np.asarray([[nxt]]), cache)
        return out
