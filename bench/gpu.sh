#!/usr/bin/env bash
# Every GPU check and benchmark, in parts, for a GPU machine that already has torch, torchvision,
# pyarrow, pyyaml, pillow and pytest (no Ray needed). Results go to $OUT (default bench/out).
#
#     bash bench/gpu.sh                          # every part, in this order
#     PARTS="tests compile" bash bench/gpu.sh    # some parts (a session's device time is short)
#     OUT=/tmp/gpu PY=/path/to/python bash bench/gpu.sh
#
# The parts, most wanted first:
#   tests    the CUDA tests (pooling, DCN, compiled RoI stages, AMP, no host syncs) and the CPU ones they share
#   compile  bench_model.py with AMP, RoI stages eager vs compiled (default, reduce-overhead = CUDA
#            graphs), and the profile's operator / kernel counts of each
#   model    bench_model.py in fp32 and with AMP (TSD / sibling / torchvision, pooling vs roi_align)
#   configs  the configs' whole models: Cascade-DCN-X101 TSD with either DCN kernel at 2 and 4 images
#            per GPU; R50-FPN TSD vs sibling at 4 images per GPU, eager and compiled
#   dcn      the two deformable-conv kernels on the mission backbone's layers, fp32 and AMP
#   train    training images/s and data-wait fraction per loader-worker count (TSD, then sibling)
#   profile  torch.profiler of both heads with AMP, eager
set -u
OUT=${OUT:-bench/out}
PY=${PY:-python3}
PARTS=${PARTS:-tests compile model configs dcn train profile}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) $*"; "$@" || echo "!! failed ($?): $*"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import os, torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cores', len(os.sched_getaffinity(0)))" | tee -a "$OUT/gpu.txt"
if want tests; then
    step $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_ops.py tests/test_losses.py \
        tests/test_deform_conv.py tests/test_compiled_stage.py tests/test_roi_sampling.py --junitxml="$OUT/pytest.xml"
fi
if want compile; then
    for mode in eager default reduce-overhead; do
        step $PY bench/bench_model.py --device cuda --amp --repeats 10 --compile $mode --out "$OUT/model_amp_$mode.json"
        step $PY bench/profile_model.py --device cuda --amp --rows 10 --compile $mode > "$OUT/profile_amp_$mode.txt" 2>&1
    done
fi
if want model; then
    step $PY bench/bench_model.py --device cuda --repeats 10 --out "$OUT/model_fp32.json"
fi
if want configs; then
    step $PY bench/bench_model_configs.py --device cuda --amp --images-per-gpu 4 \
        --configs configs/faster_rcnn_r50_fpn_tsd_coco.yaml,configs/faster_rcnn_r50_fpn_sibling_coco.yaml \
        --compare model.roi.compile=eager,reduce-overhead --out "$OUT/model_configs_r50_amp.json"
    step $PY bench/bench_model_configs.py --device cuda --amp --images-per-gpu 2,4 \
        --configs configs/cascade_rcnn_x101_64x4d_dcn_fpn_tsd_coco.yaml \
        --compare model.backbone.dcn_kernel=torchvision,grid_sample --out "$OUT/model_configs_cascade_amp.json"
fi
if want dcn; then
    step $PY bench/bench_deform_conv.py --device cuda --out "$OUT/deform_conv_fp32.json"
    step $PY bench/bench_deform_conv.py --device cuda --amp --out "$OUT/deform_conv_amp.json"
fi
if want train; then
    step $PY bench/bench_train.py --device cuda --set train.amp=fp16 --loader-workers "${WORKERS:-1,2,4}" \
        --out "$OUT/train_tsd_fp16.json"
    step $PY bench/bench_train.py --device cuda --set train.amp=fp16 --set model.roi.head=sibling \
        --loader-workers "${SIBLING_WORKERS:-4}" --out "$OUT/train_sibling_fp16.json"
fi
if want profile; then
    step $PY bench/profile_model.py --device cuda --amp > "$OUT/profile_amp.txt" 2>&1
fi
