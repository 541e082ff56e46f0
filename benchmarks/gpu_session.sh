#!/usr/bin/env bash
# Every GPU path once, in one go, on a lent GPU machine (issue 28). Each step has its own time limit and
# writes its log under $OUT; a failing step does not stop the next. Without a GPU it runs the same code
# on a small model, for trying the script out (nothing is written to RESULTS.md then).
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh
#
# The GPU machine's image has torch but not Ray, Optuna or pydantic: they travel as .gpu/site.tar.xz
# (packages unpacked from their cp312 wheels; see benchmarks/README.md) and go on PYTHONPATH.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_AUTH_MODE=token
PY=${PY:-python3}
if ! $PY -c 'import ray, optuna, pydantic' 2>/dev/null && [ -f .gpu/site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "step $name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/env.log"
}

{
  date; nvidia-smi 2>&1 | head -15
  $PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'
  $PY -c 'import ray, optuna, pydantic, timm, pandas; import mae_search.search.run
print("ray", ray.__version__, "optuna", optuna.__version__, "pydantic", pydantic.__version__,
      "timm", timm.__version__, "pandas", pandas.__version__)'
} >"$OUT/env.log" 2>&1
GPU=$($PY -c 'import torch; print(int(torch.cuda.is_available()))')

if [ "$GPU" = 1 ]; then
  step throughput 170 $PY -m benchmarks.trainer_throughput --gpu --profile "$OUT/profile.txt"
  step tests 130 $PY -m pytest -q -p no:cacheprovider --durations=10 tests/test_train.py tests/test_model.py \
    tests/test_losses.py tests/test_masking.py tests/test_evaluate.py tests/test_finetune.py
  step search 190 $PY -m benchmarks.gpu_checks search
  step stream 90 $PY -m benchmarks.gpu_checks stream
else
  step throughput 300 $PY -c "from benchmarks.trainer_throughput import run_gpu
print(run_gpu(8, 3, device='cpu', preset='tiny', with_compile=False, profile_to='$OUT/profile.txt'))"
  step tests 300 $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/test_losses.py tests/test_masking.py
  step search 400 $PY -m benchmarks.gpu_checks search --gpus 0 --cpus 1
  step stream 200 $PY -m benchmarks.gpu_checks stream --device cpu --preset tiny --images 600 --batch 64
fi
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
