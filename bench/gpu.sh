#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a GPU machine that already has torch, torchvision,
# pyarrow, pyyaml, pillow and pytest (no Ray needed): the CUDA tests, the pooling/detector benchmark
# in fp32 and with AMP, and training images/s + data-wait fraction for several loader-worker counts
# (TSD, then the sibling head at the same settings), and a profile of both heads with AMP.
# Results go to $OUT (default bench/out).
#
#     bash bench/gpu.sh            # or: OUT=/tmp/gpu PY=/path/to/python bash bench/gpu.sh
set -u
OUT=${OUT:-bench/out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
step() { echo "== $*"; "$@" || echo "!! failed ($?): $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import os, torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cores', len(os.sched_getaffinity(0)))" | tee -a "$OUT/gpu.txt"
step $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_ops.py tests/test_losses.py \
    --junitxml="$OUT/pytest.xml"
step $PY bench/bench_model.py --device cuda --repeats 10 --out "$OUT/model_fp32.json"
step $PY bench/bench_model.py --device cuda --amp --repeats 10 --out "$OUT/model_amp.json"
step $PY bench/bench_train.py --device cuda --set train.amp=fp16 --loader-workers "${WORKERS:-1,2,4}" \
    --out "$OUT/train_tsd_fp16.json"
step $PY bench/bench_train.py --device cuda --set train.amp=fp16 --set model.roi.head=sibling \
    --loader-workers "${SIBLING_WORKERS:-4}" --out "$OUT/train_sibling_fp16.json"
step $PY bench/profile_model.py --device cuda --amp > "$OUT/profile_amp.txt" 2>&1
