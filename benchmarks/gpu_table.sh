#!/usr/bin/env bash
# The GPU table of docs/performance.md in one command: the pretraining step of ResNet-50 at
# 224 px and of the CIFAR ResNet-18 at 32 px, mixed_bfloat16, with and
# without XLA, each in its own process, interleaved (benchmarks/throughput.py).
#
#   benchmarks/gpu_table.sh                    # writes gpu_table.json
#   R50_BATCH=256 R18_BATCH=1024 benchmarks/gpu_table.sh
#
# Batches are per view (a pretraining step sees 2 x BATCH images); raise them
# to the largest that fits. TF_FORCE_GPU_ALLOW_GROWTH lets the four worker
# processes share one GPU. Not yet run: no GPU machine was available when it
# was written. PyTorch's anchor (../shared/anchors/torch_simclr_step.py) runs
# on the CPU only, so its torch.compile figure for the same GPU still has to be
# taken by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
R50_BATCH=${R50_BATCH:-128}
R18_BATCH=${R18_BATCH:-512}
r50="@depth=50@size=224"
configs="pretrain-step-bf16-b${R18_BATCH},pretrain-step-bf16-xla-b${R18_BATCH}"
configs+=",pretrain-step-bf16-b${R50_BATCH}${r50}"
configs+=",pretrain-step-bf16-xla-b${R50_BATCH}${r50}"
export TF_FORCE_GPU_ALLOW_GROWTH=true
exec "$PYTHON" benchmarks/throughput.py --configs "$configs" \
    --steps 20 --repeats 3 --warmup 5 --max_live 4 \
    --json "${OUT:-gpu_table.json}" "$@"
