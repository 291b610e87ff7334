#!/usr/bin/env bash
# The GPU check of the CuPy path, as one script (each step has its own time limit):
#   1. the test suite with the CuPy cases, 2. `tinyuvit bench` beside PyTorch (tiny b128),
#   3. the GPU default `train-mnist --device gpu`, timed, 4. `evaluate --device gpu` (10,000
#   samples), 5. bench of small b512 in fp32 and TF32. Logs go to $OUT (default: gpu_check/).
#
#   MNIST=path/to/mnist bash examples/gpu_check.sh
# Autograd wheels in .whl/ are installed first if present (the GPU tests of gradients use it).
set -u
OUT=${OUT:-gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/tmp/tinyuvit-cache TINYUVIT_DATA=${MNIST:-$TINYUVIT_DATA}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { echo; echo "=== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion(), 'numpy', numpy.__version__)"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" || true

step "1. tests (CuPy cases included)"
timeout 120 python3 -m pytest -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -25

step "2. bench tiny b128 beside PyTorch (fp32)"
timeout 80 python3 -m tinyuvit.cli bench --device gpu --compare torch --preset tiny --batch 128 \
  --rounds 3 --json "$OUT/bench_tiny.json" 2>&1 | tee "$OUT/bench_tiny.log"

step "3. train-mnist --device gpu (defaults), at most ${TRAIN_LIMIT:-180} s (SIGTERM saves)"
TIMER=$([ -x /usr/bin/time ] && echo "/usr/bin/time -v")
timeout -s TERM ${TRAIN_LIMIT:-180} $TIMER python3 -m tinyuvit.cli train-mnist --device gpu \
  --out /tmp/gpu-run --quiet > "$OUT/train.log" 2>&1
echo "exit $?"; grep -E "training|data:|done|stopped|Elapsed|Maximum resident" "$OUT/train.log"
tail -1 /tmp/gpu-run/metrics.jsonl
cp /tmp/gpu-run/{samples.png,loss.png,metrics.jsonl,config.json} "$OUT/" 2>/dev/null

step "4. evaluate --device gpu (10,000 samples)"
timeout 90 python3 -m tinyuvit.cli evaluate --device gpu --checkpoint /tmp/gpu-run --quiet \
  --json "$OUT/eval.json" 2>&1 | tee "$OUT/eval.log"

step "5. bench small b512 beside PyTorch, fp32 then TF32"
timeout 70 python3 -m tinyuvit.cli bench --device gpu --compare torch --preset small --batch 512 \
  --rounds 2 --repeats 8 --warmup 3 --json "$OUT/bench_small.json" 2>&1 | tee "$OUT/bench_small.log"
timeout 45 python3 -m tinyuvit.cli bench --device gpu --compare torch --tf32 --preset small --batch 512 \
  --rounds 2 --repeats 8 --warmup 3 --json "$OUT/bench_small_tf32.json" 2>&1 | tee "$OUT/bench_small_tf32.log"
step "end"
