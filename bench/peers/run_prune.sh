#!/usr/bin/env bash
# Pruning side by side: llmcompressor's SparseGPT / Wanda in its own venv, then bench/prune.py
# prunes with llmpress and evaluates everything in one run.   bench/peers/run_prune.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-out/prune-peers}
LC_PY=${LC_PY:-.lc-venv/bin/python}
[ -x "$LC_PY" ] || bench/peers/setup.sh
mkdir -p "$OUT"
.venv/bin/python -c "
import llmpress as lp; from safetensors.torch import save_file
m = lp.load('smollm2-135m'); t = lp.data.Calibration('wiki', n_samples=64, seqlen=512).tokens(m.llmpress_tokenizer)
save_file({'tokens': t.contiguous()}, '$OUT/calib.safetensors')"
"$LC_PY" bench/peers/llmcompressor_run.py "$OUT/lc" "$OUT/calib.safetensors" lc-sparsegpt-50,lc-wanda-50,lc-sparsegpt-2of4,lc-wanda-2of4
.venv/bin/python bench/prune.py --peers "$OUT" "${@:2}"
