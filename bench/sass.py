"""Compile llmpress's Triton kernels for sm_90 on a machine without a GPU and count the SASS
instructions of their hot loop (Triton's bundled ptxas / cuobjdump). Pointer and integer
arguments get the divisibility-16 specialisation the device gives aligned arguments.

  python bench/sass.py tc --bits 4 --bm 16 --bn 64 --bk 128 --warps 4 --stages 3
  python bench/sass.py gemv --bits 4 --bn 16 --ng 8 --wpg 16 --warps 4
  python bench/sass.py kn --bn 512 --bw 16 --steps 1 --sk 32 --warps 4 --f16x2
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llmpress.kernels import triton_wa16 as k  # noqa: E402


def compile_sass(fn, sig: dict, consts: dict, div16: list[str], warps: int, stages: int) -> str:
    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn, {**sig, **{c: "constexpr" for c in consts}},
                    constexprs={(names.index(c),): v for c, v in consts.items()}, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.cubin")
        Path(f).write_bytes(ck.asm["cubin"])
        return subprocess.run([str(tool), "-sass", f], capture_output=True, text=True, check=True).stdout


def loops(sass: str) -> list[list[str]]:
    """Instruction lines of each backward-branch loop body (innermost first)."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    out = []
    for addr, txt in ins:
        if " BRA " in f" {txt} ":  # predicated or not
            t = re.search(r"0x([0-9a-f]+)", txt)
            if t and int(t.group(1), 16) < addr:
                start = int(t.group(1), 16)
                out.append([x for a, x in ins if start <= a <= addr])
    return sorted(out, key=len)


def summary(body: list[str]) -> dict[str, int]:
    c: dict[str, int] = {}
    for t in body:
        op = t.split()[0] if not t.startswith("@") else t.split()[1]
        op = op.split(".")[0]
        c[op] = c.get(op, 0) + 1
    return dict(sorted(c.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=["tc", "gemv", "kn"])
    ap.add_argument("--kmajor", action="store_true", help="tc: K-major words (the default pack of 4-bit codes)")
    ap.add_argument("--bw", type=int, default=16, help="kn: word rows per step")
    ap.add_argument("--steps", type=int, default=1, help="kn: steps per program")
    ap.add_argument("--xscale", action="store_true", help="kn: x scaled per step (no overflow redo)")
    ap.add_argument("--pdl", action="store_true", help="kn: programmatic dependent launch (griddepcontrol)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--bm", type=int, default=16)
    ap.add_argument("--bn", type=int, default=64)
    ap.add_argument("--bk", type=int, default=128)
    ap.add_argument("--sk", type=int, default=4)
    ap.add_argument("--ng", type=int, default=8)
    ap.add_argument("--wpg", type=int, default=16)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--dump", action="store_true")
    ap.add_argument("--no-prefetch", action="store_true", help="GEMV without its manual prefetch (for --stages > 1)")
    ap.add_argument("--f16x2", action="store_true", help="the GEMV's packed-half 4-bit path")
    ap.add_argument("--lut", action="store_true", help="the code-book (NF4 / FP4) variant of the tensor-core kernel")
    a = ap.parse_args()
    per = 32 // a.bits
    if a.kernel == "tc":
        sig = dict(X="*bf16", QW="*i32", S="*bf16", Z="*bf16", LUT="*bf16", B="*bf16", O="*bf16", PW="*fp32",
                   CNT="*i32", M="i32", N="i32", K="i32", GS="i32", stride_xm="i32", stride_om="i32",
                   m_bucket="i32", code_mask="i32")
        # the unit strides are specialised to 1 (as the launcher does): along K for N-major words,
        # along N for K-major ones
        unit, other = (["stride_qn", "stride_sn"], ["stride_qk", "stride_sg"]) if a.kmajor else \
            (["stride_qk", "stride_sg"], ["stride_qn", "stride_sn"])
        sig.update({n: "i32" for n in other})
        consts = dict(BITS=a.bits, HAS_LUT=a.lut, HAS_BIAS=False, FP32_DOT=False, BLOCK_M=a.bm, BLOCK_N=a.bn,
                      BLOCK_K=a.bk, SPLIT_K=a.sk, **{n: 1 for n in unit})
        div = ["X", "QW", "S", "Z", "O", "PW", "CNT", "N", "K", "GS", "stride_xm", "stride_om", *other]
        sass = compile_sass(k._wa16_kernel, sig, consts, div, a.warps, a.stages)
        codes = a.bn * a.bk
    elif a.kernel == "kn":
        sig = dict(X="*bf16", QT="*i32", ST="*bf16", ZT="*bf16", B="*bf16", O="*bf16", WS="*fp32", CNT="*i32",
                   N="i32", K="i32", G="i32", GS="i32", stride_sg="i32")
        consts = dict(HAS_BIAS=False, BLOCK_N=a.bn, BW=a.bw, STEPS=a.steps, SPLIT=a.sk, EVEN=True, F16X2=a.f16x2, CHECK=True, XSCALE=a.xscale,
                      PDL=a.pdl)
        div = ["X", "QT", "ST", "ZT", "O", "WS", "CNT", "N", "K", "GS", "stride_sg"]
        sass = compile_sass(k._gemv_kn_kernel, sig, consts, div, a.warps, 1)
        codes = a.bn * a.bw * a.steps * 8
    else:
        sig = dict(X="*bf16", QW="*i32", S="*bf16", Z="*bf16", LUT="*bf16", B="*bf16", O="*bf16", WS="*fp32",
                   CNT="*i32", N="i32", K="i32", KW="i32", G="i32", GS="i32", stride_qn="i32", stride_sn="i32",
                   code_mask="i32")
        consts = dict(BITS=a.bits, HAS_LUT=False, HAS_BIAS=False, BLOCK_N=a.bn, NG=a.ng, WPG=a.wpg, SPLIT_K=a.sk,
                      PREFETCH=not a.no_prefetch, EVEN=True, F16X2=a.f16x2)
        div = ["X", "QW", "S", "Z", "O", "WS", "CNT", "N", "K", "KW", "G", "GS", "stride_qn", "stride_sn"]
        sass = compile_sass(k._gemv_kernel, sig, consts, div, a.warps, a.stages)
        codes = a.bn * a.ng * a.wpg * per
    if a.dump:
        print(sass)
    ls = loops(sass)
    if a.kernel == "kn":  # no loop over K: count the whole kernel
        n_ins = sum(1 for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln))
        print(f"kn: {n_ins} instructions per thread, {codes} codes per program, "
              f"{n_ins * 32 * a.warps / codes:.2f} instructions per code (fallback path included)")
        return
    body = ls[-1] if ls else []
    if a.kernel == "gemv" and a.f16x2 and len(ls) > 1:  # the packed-half loop, not the float32 fallback after it
        body = max(ls, key=lambda b: sum(t.split()[0].startswith("HFMA2") for t in b))
    threads = 32 * a.warps
    print(f"loop: {len(body)} instructions per thread per step, {codes} codes per step per program, "
          f"{len(body) * threads / codes:.2f} instructions per code")
    print(summary(body))


if __name__ == "__main__":
    main()
