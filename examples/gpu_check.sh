#!/usr/bin/env bash
# The GPU check of the CuPy path, as one script that fits one 10-minute call (each step has
# its own time limit). Steps, chosen with STEPS (default: all, in this order):
#   tests   the whole test suite, CuPy cases included (pytest-xdist, 8 workers, if present)
#   bench   `tinyuvit bench` of tiny b128 beside PyTorch and the unfused path, with kernel counts
#   train   the GPU default `train-mnist --device gpu`, timed (SIGTERM at TRAIN_LIMIT saves it);
#           with TRAIN2_ARGS, a second run with those options at the same time (both then share
#           the GPU: their times are upper bounds of each alone)
#   eval    `evaluate --device gpu --labels data` of that run (10,000 samples, drawn as the CPU
#           figures are), then of the second run, then of the first again with EVAL_ARGS (e.g.
#           another guidance) if given; the first run's sampling weights go to $OUT/eval_weights.npz
#           (`tinyuvit export`, 12 MB: `evaluate --checkpoint` reads it, to score it again on a CPU)
#   bench-small  the same for small b512 in fp32, then TF32; memory at batches 256 and 64
#   ablate  (only when named) `tinyuvit ablate --quick --device gpu` of the sweep, each seed's
#           models side by side: U-ViT of each seed first (three processes), then that seed's
#           groups (ABLATE_GROUPS, ';' between groups), each in its own folder that --join gave
#           U-ViT's run; SIGINT at ABLATE_LIMIT s saves the runs in training. The folders (no
#           checkpoints), the logs with /usr/bin/time -v and nvidia-smi's samples go to
#           $OUT/ablate.tar.gz; join them into one study with `tinyuvit ablate --quick --join`
# If the fused CUDA kernels fail to build or run, the rest runs without them (TINYUVIT_FUSED=0).
# Logs and results go to $OUT (default: gpu_check/), up to 9 files; every step also prints to
# the terminal. (Where fewer files can come back, point OUT elsewhere and tar it afterwards.)
#
#   MNIST=path/to/mnist bash examples/gpu_check.sh
#   STEPS="tests bench" MNIST=.mnist bash examples/gpu_check.sh   (the steps run in the order above)
# Autograd wheels in .whl/ are installed first if present (the GPU tests of gradients use it).
set -u
OUT=${OUT:-gpu_check}; mkdir -p "$OUT"
STEPS=${STEPS:-tests bench train eval bench-small}
export PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/tmp/tinyuvit-cache TINYUVIT_DATA=${MNIST:-${TINYUVIT_DATA:-}}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
RUN=${RUN:-/tmp/gpu-run}
step() { echo; echo "=== $1 ($(date +%T))"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

[ -f "${TINYUVIT_DATA:-/nonexistent}/train-images-idx3-ubyte.gz" ] || \
  echo "WARNING: MNIST=$TINYUVIT_DATA holds no MNIST files: training and FID use the embedded subset"

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion(), 'numpy', numpy.__version__)"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" || true

step "fused kernels: build and one call each"
if ! timeout 60 python3 -c "
import cupy as cp, numpy as np
from tinyuvit import kernels
x = cp.asarray(np.random.default_rng(0).standard_normal((64, 51, 128)), dtype=np.float32)
y, xh, r = kernels.layernorm_forward(x, None, None, 1e-5, True)
dx = kernels.layernorm_backward(x, xh, r, None)
p = kernels.softmax(x); ds = kernels.softmax_backward(p, x); g, s = kernels.gelu(x, slope=True)
e = x.ravel().copy(); kernels.ema_update(e, x.ravel(), 0.5)
m, v = cp.zeros_like(e), cp.zeros_like(e); kernels.adamw_step(e, x.ravel(), m, v, True, 0.99, 0.9, 0.999, 0.001, 1e-3, 1e-8)
cp.cuda.Stream.null.synchronize()
print('ok: LayerNorm |mean| %.1e, softmax row sums %.6f' % (float(abs(y.mean(-1)).max()), float(p.sum(-1).mean())))
"; then echo "FUSED KERNELS FAILED: running without them"; export TINYUVIT_FUSED=0; fi

if want tests; then
  step "tests (CuPy cases included)"
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-8}")
  timeout ${TEST_LIMIT:-110} python3 -m pytest -q -p no:cacheprovider $XDIST -rfEs > "$OUT/pytest.log" 2>&1
  echo "exit $?"; grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
  grep -E "^E  " "$OUT/pytest.log" | head -30
  grep -E "^SKIPPED" "$OUT/pytest.log" | sed -E 's/^SKIPPED \[[0-9]+\] //' | sort | uniq -c | sort -rn | head -8
fi

if want bench; then
  step "bench tiny b128 beside PyTorch (fp32), with the kernels of one call"
  timeout ${BENCH_LIMIT:-60} python3 -m tinyuvit.tools.cli bench --device gpu --compare torch --compare unfused \
    --preset tiny --batch 128 --rounds 3 --kernels --json "$OUT/bench_tiny.json" 2>&1
fi

if want train; then
  step "train-mnist --device gpu (defaults), at most ${TRAIN_LIMIT:-250} s (SIGTERM saves)"
  rm -rf "$RUN" "$RUN-2"
  TIMER=$([ -x /usr/bin/time ] && echo "/usr/bin/time -v")
  train() {  # out-folder log args...
    local out=$1 log=$2; shift 2
    local start=$(date +%s.%N)
    timeout -s TERM ${TRAIN_LIMIT:-250} $TIMER python3 -m tinyuvit.tools.cli train-mnist --device gpu \
      --out "$out" --quiet "$@" > "$log" 2>&1
    echo "exit $? after $(python3 -c "import time; print(round(time.time() - $start, 1))") s: train-mnist --device gpu $*" >> "$log"
  }
  train "$RUN" /tmp/train.log ${TRAIN_ARGS:-} &
  [ -n "${TRAIN2_ARGS:-}" ] && train "$RUN-2" /tmp/train2.log $TRAIN2_ARGS &
  wait
  for n in "" 2; do
    [ -f /tmp/train$n.log ] || continue
    grep -E "training|data:|done|stopped|Elapsed|Maximum resident|rror|^exit" /tmp/train$n.log
    r=$RUN$([ -n "$n" ] && echo "-2"); tail -1 "$r/metrics.jsonl"
  done
  cat /tmp/train.log /tmp/train2.log > "$OUT/train.log" 2>/dev/null
  cp "$RUN/samples.png" "$OUT/" 2>/dev/null
fi

if want eval; then
  step "evaluate --device gpu --labels data (10,000 samples)"
  rm -f "$OUT/eval_weights.npz"   # export writes over no checkpoint, this script's own included
  python3 -m tinyuvit.tools.cli export --checkpoint "$RUN" --out "$OUT/eval_weights.npz" 2>&1
  timeout ${EVAL_LIMIT:-100} python3 -m tinyuvit.tools.cli evaluate --device gpu --checkpoint "$RUN" --quiet --labels data \
    --json "$OUT/eval.json" --picture "$OUT/eval_pixels.png" 2>&1
  if [ -d "$RUN-2" ]; then
    step "evaluate the second run ($TRAIN2_ARGS)"
    timeout ${EVAL_LIMIT:-100} python3 -m tinyuvit.tools.cli evaluate --device gpu --checkpoint "$RUN-2" --quiet --labels data \
      --json /tmp/eval2.json 2>&1
  fi
  if [ -n "${EVAL_ARGS:-}" ]; then
    step "evaluate the first run with $EVAL_ARGS"
    timeout ${EVAL_LIMIT:-100} python3 -m tinyuvit.tools.cli evaluate --device gpu --checkpoint "$RUN" --quiet --labels data \
      --json /tmp/eval3.json $EVAL_ARGS 2>&1
  fi
fi

if want bench-small; then
  step "bench small b512 beside PyTorch, fp32 then TF32"
  timeout ${BENCH_LIMIT:-60} python3 -m tinyuvit.tools.cli bench --device gpu --compare torch --compare unfused \
    --preset small --batch 512 --rounds 2 --repeats 8 --warmup 3 --kernels --json "$OUT/bench_small.json" 2>&1
  timeout ${BENCH_LIMIT:-60} python3 -m tinyuvit.tools.cli bench --device gpu --compare torch --tf32 --preset small \
    --batch 512 --rounds 2 --repeats 8 --warmup 3 --json "$OUT/bench_small_tf32.json" 2>&1
  step "memory at the GPU default batch (256) and a 4 GB card's (64)"
  timeout ${BENCH_LIMIT:-60} python3 -m tinyuvit.tools.cli bench --device gpu --preset tiny --preset small --batch 256 64 \
    --rounds 1 --repeats 2 --warmup 1 2>&1
fi
if want ablate; then
  GROUPS_=${ABLATE_GROUPS:-patch_size=2;depth;width;patch_size=7}
  ABLATE=${ABLATE_CMD:-python3 -m tinyuvit.tools.cli ablate --quick --device gpu --quiet}
  A=${ABLATE_DIR:-/tmp/gpu-ablate}; rm -rf "$A"; mkdir -p "$A/logs"
  step "ablate: seeds ${ABLATE_SEEDS:-0 1 2} x U-ViT, then groups '$GROUPS_', side by side, at most ${ABLATE_LIMIT:-480} s"
  TIMER=$([ -x /usr/bin/time ] && echo "/usr/bin/time -v")
  export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
  python3 -c "from tinyuvit.tools.metrics import reference_stats; r = reference_stats(data_dir='${TINYUVIT_DATA:-}' or None); print('FID reference:', r['source'])" 2>&1
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$A/logs/nvidia-smi.csv" 2>&1 &
  SMI=$!
  t0=$(date +%s); deadline=$((t0 + ${ABLATE_LIMIT:-480}))
  pack() { tar -czf "$OUT/ablate.tar.gz" -C "$A" --exclude=checkpoint.npz --exclude='*.lock' . ; }
  ( sleep $((${ABLATE_LIMIT:-480} + 40)) && echo "ablate: still running 40 s past the deadline; packed what there is" && pack ) &
  WATCH=$!              # should anything hang, what finished still comes back (a killed sleep packs nothing)
  ablate() {  # log, then ablate's options; stopped by SIGINT at the deadline (a run in training saves)
    local log=$1; shift; local left=$((deadline - $(date +%s)))
    [ $left -gt 5 ] || { echo "not started: past the deadline" >> "$log"; return 0; }
    echo "+ ablate $* ($(date +%T))" >> "$log"
    timeout -s INT $left $TIMER $ABLATE "$@" >> "$log" 2>&1; echo "exit $? ($(date +%T))" >> "$log"
  }
  IFS=';' read -ra groups <<< "$GROUPS_"; seeds=()
  for s in ${ABLATE_SEEDS:-0 1 2}; do
    (
      ablate "$A/logs/s$s-g0.log" --out "$A/s$s-g0" --only uvit --seeds $s
      for g in "${!groups[@]}"; do   # every group's folder takes U-ViT's run before any starts
        [ $g -eq 0 ] || $ABLATE --out "$A/s$s-g$g" --join "$A/s$s-g0" >> "$A/logs/s$s-g$g.log" 2>&1
      done
      for g in "${!groups[@]}"; do
        ablate "$A/logs/s$s-g$g.log" --out "$A/s$s-g$g" --only "${groups[$g]}" --seeds $s &
      done
      wait
    ) &
    seeds+=($!)
  done
  wait "${seeds[@]}"    # not nvidia-smi's sampler, which runs until it is killed
  echo "ablate: $(( $(date +%s) - t0 )) s from the first run's start to the last one's end"
  pkill -P $WATCH 2>/dev/null; kill $SMI $WATCH 2>/dev/null
  grep -hE "^\+ ablate|: class accuracy|stopped|diverged|rror|Elapsed|Maximum resident|^exit" "$A"/logs/s*.log
  pack && ls -l "$OUT/ablate.tar.gz"
fi
step "end"
