#!/usr/bin/env bash
# The GPU check of the CuPy path, as one script that fits one 10-minute call (each step has
# its own time limit). Steps, chosen with STEPS (default: all, in this order):
#   tests   the whole test suite, CuPy cases included (pytest-xdist, 8 workers, if present)
#   train   the GPU default `train-mnist --device gpu`, timed (SIGTERM at TRAIN_LIMIT saves it)
#   eval    `evaluate --device gpu` of that run (10,000 samples, its defaults)
#   bench   `tinyuvit bench` beside PyTorch: tiny b128 (with the kernel count), small b512 in
#           fp32 and TF32
# Logs and results go to $OUT (default: gpu_check/); every step also prints to the terminal.
#
#   MNIST=path/to/mnist bash examples/gpu_check.sh
#   STEPS="tests bench" MNIST=.mnist bash examples/gpu_check.sh
# Autograd wheels in .whl/ are installed first if present (the GPU tests of gradients use it).
set -u
OUT=${OUT:-gpu_check}; mkdir -p "$OUT"
STEPS=${STEPS:-tests train eval bench}
export PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/tmp/tinyuvit-cache TINYUVIT_DATA=${MNIST:-${TINYUVIT_DATA:-}}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
RUN=${RUN:-/tmp/gpu-run}
step() { echo; echo "=== $1 ($(date +%T))"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion(), 'numpy', numpy.__version__)"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" || true

if want tests; then
  step "tests (CuPy cases included)"
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-8}")
  timeout ${TEST_LIMIT:-110} python3 -m pytest -q -p no:cacheprovider $XDIST -rs > "$OUT/pytest.log" 2>&1
  echo "exit $?"; grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
  grep -E "^SKIPPED" "$OUT/pytest.log" | sed -E 's/^SKIPPED \[[0-9]+\] //' | sort | uniq -c | sort -rn | head -8
fi

if want train; then
  step "train-mnist --device gpu (defaults), at most ${TRAIN_LIMIT:-250} s (SIGTERM saves)"
  rm -rf "$RUN"
  TIMER=$([ -x /usr/bin/time ] && echo "/usr/bin/time -v")
  START=$(date +%s.%N)
  timeout -s TERM ${TRAIN_LIMIT:-250} $TIMER python3 -m tinyuvit.cli train-mnist --device gpu \
    --out "$RUN" --quiet ${TRAIN_ARGS:-} > "$OUT/train.log" 2>&1
  echo "exit $?, wall $(python3 -c "import time; print(round(time.time() - $START, 1))") s"
  grep -E "training|data:|done|stopped|Elapsed|Maximum resident|rror" "$OUT/train.log"
  tail -1 "$RUN/metrics.jsonl"
  cp "$RUN/metrics.jsonl" "$OUT/" 2>/dev/null; cp "$RUN/samples.png" "$OUT/" 2>/dev/null
fi

if want eval; then
  step "evaluate --device gpu (10,000 samples)"
  timeout ${EVAL_LIMIT:-100} python3 -m tinyuvit.cli evaluate --device gpu --checkpoint "$RUN" --quiet \
    --json "$OUT/eval.json" --picture "$OUT/eval_pixels.png" 2>&1 | tee "$OUT/eval.log"
fi

if want bench; then
  step "bench tiny b128 beside PyTorch (fp32), with the kernels of one call"
  timeout ${BENCH_LIMIT:-60} python3 -m tinyuvit.cli bench --device gpu --compare torch --preset tiny --batch 128 \
    --rounds 3 --kernels --json "$OUT/bench_tiny.json" 2>&1
  step "bench small b512 beside PyTorch, fp32 then TF32"
  timeout ${BENCH_LIMIT:-60} python3 -m tinyuvit.cli bench --device gpu --compare torch --preset small --batch 512 \
    --rounds 2 --repeats 8 --warmup 3 --kernels --json "$OUT/bench_small.json" 2>&1
  timeout ${BENCH_LIMIT:-60} python3 -m tinyuvit.cli bench --device gpu --compare torch --tf32 --preset small \
    --batch 512 --rounds 2 --repeats 8 --warmup 3 --json "$OUT/bench_small_tf32.json" 2>&1
  step "memory at the GPU default batch (256) and a 4 GB card's (64)"
  timeout ${BENCH_LIMIT:-60} python3 -m tinyuvit.cli bench --device gpu --preset tiny --preset small --batch 256 64 \
    --rounds 1 --repeats 2 --warmup 1 2>&1
fi
step "end"
