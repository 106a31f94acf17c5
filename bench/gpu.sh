#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a GPU machine that already has torch, torchvision,
# pyarrow, pyyaml, pillow and pytest (no Ray needed): the CUDA tests, the pooling/detector benchmark
# in fp32 and with AMP, and training images/s + data-wait fraction for several loader-worker counts
# (TSD, then the sibling head at the same settings), a profile of both heads with AMP, the two
# deformable-conv kernels on the mission backbone's layers, and the configs' whole models
# (Cascade-DCN-X101 TSD with either DCN kernel; R50-FPN TSD vs sibling) at 2 and 4 images per GPU.
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
step $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_ops.py tests/test_losses.py tests/test_deform_conv.py \
    --junitxml="$OUT/pytest.xml"
step $PY bench/bench_model.py --device cuda --repeats 10 --out "$OUT/model_fp32.json"
step $PY bench/bench_model.py --device cuda --amp --repeats 10 --out "$OUT/model_amp.json"
step $PY bench/bench_train.py --device cuda --set train.amp=fp16 --loader-workers "${WORKERS:-1,2,4}" \
    --out "$OUT/train_tsd_fp16.json"
step $PY bench/bench_train.py --device cuda --set train.amp=fp16 --set model.roi.head=sibling \
    --loader-workers "${SIBLING_WORKERS:-4}" --out "$OUT/train_sibling_fp16.json"
step $PY bench/profile_model.py --device cuda --amp > "$OUT/profile_amp.txt" 2>&1
step $PY bench/bench_deform_conv.py --device cuda --out "$OUT/deform_conv_fp32.json"
step $PY bench/bench_deform_conv.py --device cuda --amp --out "$OUT/deform_conv_amp.json"
step $PY bench/bench_model_configs.py --device cuda --amp --images-per-gpu 2,4 \
    --configs configs/cascade_rcnn_x101_64x4d_dcn_fpn_tsd_coco.yaml \
    --compare model.backbone.dcn_kernel=torchvision,grid_sample --out "$OUT/model_configs_cascade_amp.json"
step $PY bench/bench_model_configs.py --device cuda --amp --images-per-gpu 4 \
    --configs configs/faster_rcnn_r50_fpn_tsd_coco.yaml --compare model.roi.head=tsd,sibling \
    --out "$OUT/model_configs_r50_amp.json"
