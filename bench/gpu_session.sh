#!/usr/bin/env bash
# One device call: install carried wheels, then the kernel and/or decode benches. Logs under $OUT.
# usage: bench/gpu_session.sh kernels|decode|spec|scale|all [extra args]
set -u
OUT=${OUT:-/tmp/out}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
what=${1:-all}; shift || true
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
case $what in
  kernels|all) python3 bench/kernels.py --out "$OUT" --partial "$OUT/gpu-kernels-partial.json" "$@" 2>&1 | tee "$OUT/kernels.log" ;;
esac
case $what in
  decode|all) python3 bench/decode.py --out "$OUT" "$@" 2>&1 | tee "$OUT/decode.log" ;;
esac
case $what in
  scale) python3 bench/scale.py --out "$OUT" --work /tmp/scale "$@" 2>&1 | grep -v "GPTQ | METRIC\|compress_module_list" | tee "$OUT/scale.log" ;;
esac
case $what in
  spec|all) python3 bench/decode.py --spec --out "$OUT" "$@" 2>&1 | tee "$OUT/spec.log" ;;
esac
