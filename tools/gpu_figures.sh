#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run, for a GPU lent for minutes:
#   1. the bundle's own trainer on real DRIVE (Hiera-large, 1024 px, the paper's recipe, random weights), with 2 and
#      with 8 DataLoader workers: images per second sustained, data loading included (training_log.jsonl);
#   2. the benchmark at Hiera-tiny and Hiera-large, 1024 px: inference (SAM 2 / unmerged / merged; bf16, TF32,
#      compile), training step and peak memory (LoRA / full; bf16, activation checkpointing, compile), prompt modes.
# Each part has its own time limit, so a part that overruns leaves the others their time; what a part measured is
# kept even when it is stopped (the benchmark rewrites benchmark.partial.json after each measurement).
#
# Usage: bash tools/gpu_figures.sh DRIVE_DIR OUTPUT_DIR [SECONDS]   (SECONDS: the whole run's budget, default 540)
# OUTPUT_DIR receives a few small files (logs, JSON, Markdown); checkpoints go to a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."

drive=${1:?DRIVE folder (training/, test/) first}
out=${2:?output folder second}
budget=${3:-540}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1

left() { echo $((budget - SECONDS)); }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, monai, sam2; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'monai', monai.__version__, 'cpus', __import__('os').cpu_count())"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

python3 -m tools.prepare --dataset DRIVE --src "$drive" --output "$work/drive/datalist.json" || exit 1

bundle=(--bundle_root bundle --meta_file bundle/configs/metadata.json --logging_file bundle/configs/logging.conf
    --config_file bundle/configs/train.json)
for workers in 2 8; do
    run="$work/train_w$workers"
    echo "== bundle trainer on DRIVE, $workers workers ($(left) s left)"
    timeout 120 python3 -m monai.bundle run training "${bundle[@]}" --datalist "$work/drive/datalist.json" \
        --random_init True --max_epochs 4 --val_interval 2 --num_workers "$workers" \
        --ckpt_dir "$run/models" --output_dir "$run/eval" > "$out/train_w$workers.log" 2>&1
    echo "exit $?" >> "$out/train_w$workers.log"
    python3 - "$run/eval/training_log.jsonl" "$workers" <<'EOF' | tee -a "$out/throughput.txt"
import sys
from scripts.handlers import read_training_log, training_throughput
try:
    figures = training_throughput(read_training_log(sys.argv[1]))
except OSError as error:
    figures = f"no log ({error})"
print(f"DRIVE, Hiera-large 1024 px, batch 2, {sys.argv[2]} workers, epochs 2 on:", figures)
EOF
done

echo "== benchmark ($(left) s left)"
# Left out, since the GPU is lent for minutes: the onnxruntime backends (a CPU path, measured on the CPU machine)
# and the input modes (not among the GPU figures asked for).
timeout $(( $(left) - 10 )) python3 -m tools.benchmark --device cuda --model-sizes tiny large --image-sizes 1024 \
    --parts inference prompt_modes training data_loading \
    --repeats 5 --warmup 2 --num-workers 8 --output-dir "$out" 2> "$out/benchmark.log"
echo "benchmark exit $? ($(left) s left)"
tail -5 "$out/benchmark.log"
rm -rf "$work"
