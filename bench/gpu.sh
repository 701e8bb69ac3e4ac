#!/usr/bin/env bash
# Issue 12's GPU check, one prepared run of a few minutes on one GPU:
#   bash bench/gpu.sh [MNIST_ARCHIVE]
# mnist-sized (10,000 generated 28-px images, ResNet-18, bs 512) and pets-sized (2,000 generated
# 224-px JPEGs, ResNet-34, bs 128) training, bf16 autocast + channels_last, on the Ray Data path,
# the in-memory path and a bare DataLoader loop with the same model, data, batch size and decode
# CPUs; GPU utilisation sampled from nvidia-smi. With MNIST_ARCHIVE (mnist_tiny_png.tgz), the real
# MNIST recipe's time-to-accuracy on both Ray paths at bs 512. Output: $OUT (or ./gpu-bench)/*.log.
# Expects python3 with PyTorch (CUDA) and Ray 2.60 + the project's few other needs importable
# (on a machine without them: PYTHONPATH pointing at a --target install of their wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-bench}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RAY_AUTH_MODE=disabled RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 DVC_NO_ANALYTICS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.log"
python3 -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$out/gpu.log"
cpus=$(( $(nproc) - 4 ))       # what the train worker (4 CPUs) leaves: the bare loop's decode processes, Ray Data's decode CPUs
common=(--device cuda --channels-last --no-validate --epochs 2 --threads 4 --cpus-per-worker 4
        --loader-workers "$cpus" --decode-cpus 1)
python3 bench/throughput.py "${common[@]}" --images 10000 --side 28 --model-side 28 --arch resnet18 \
    --bs 512 --work /tmp/gpu-bench-mnist ${1:+--mnist "$1" --mnist-bs 512} 2>&1 \
    | grep -v "PlacementGroupCleaner\|^\s*$" | tee "$out/mnist_sized.log"
python3 bench/throughput.py "${common[@]}" --images 2000 --side 224 --model-side 224 --arch resnet34 \
    --bs 128 --work /tmp/gpu-bench-pets 2>&1 | grep -v "PlacementGroupCleaner\|^\s*$" | tee "$out/pets_sized.log"
