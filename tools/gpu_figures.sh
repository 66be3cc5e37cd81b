#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run, for a GPU lent for minutes. In order of what was still
# unmeasured after the first GPU run (2026-11-29: Hiera-tiny's inference and training, the trainer with 8 workers):
#   1. the prompt modes at Hiera-tiny, 1024 px (the eight-mode cost after prompted modes were batched);
#   2. the benchmark at Hiera-large, 1024 px: inference (SAM 2 / unmerged / merged; bf16, TF32, compile) and prompt
#      modes, then the training step and peak memory (LoRA / full; activation checkpointing, bf16, compile);
#   3. how long a process with persistent, pinned DataLoader workers takes to exit, with and without
#      scripts.engines.stop_loader_workers (torch 2.11 waits 5 s per worker at exit);
#   4. the bundle's own trainer on real DRIVE (Hiera-large, 1024 px, the paper's recipe, random weights) with 2 and
#      8 DataLoader workers: images per second sustained, data loading included (training_log.jsonl), and how long
#      the process takes to exit once the run has finished (it once outlived its run on the GPU machine; a run
#      still alive at its limit gets SIGABRT, and Python's faulthandler prints where every thread waits).
# Each stage has its own time limit, so one that overruns leaves the others their time; the benchmark rewrites
# benchmark.partial.json after each measurement, so a stopped stage keeps what it measured.
#
# Usage: bash tools/gpu_figures.sh DRIVE_DIR OUTPUT_DIR [SECONDS]   (SECONDS: the whole run's budget, default 580)
# OUTPUT_DIR receives small files (logs, JSON, Markdown) in one folder per stage; checkpoints go to a temporary one.
set -uo pipefail
cd "$(dirname "$0")/.."

drive=${1:?DRIVE folder (training/, test/) first}
out=${2:?output folder second}
budget=${3:-580}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1

left() { echo $((budget - SECONDS)); }
# The smaller of a stage's own limit and the time left (less 5 s to write up).
limit() { local rest=$(( $(left) - 5 )); echo $(( $1 < rest ? $1 : rest )); }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import os, torch, monai, sam2, ignite, hydra, scripts.network, tools.benchmark; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__, 'cpus', os.cpu_count())"
} > "$out/machine.txt" 2>&1
status=$?
cat "$out/machine.txt"
[ $status -eq 0 ] || { echo "the environment is not complete (above): nothing measured"; exit 2; }

benchmark() {  # benchmark STAGE SECONDS ARGUMENTS...
    local stage=$1 seconds; seconds=$(limit "$2"); shift 2
    echo "== benchmark $stage, $seconds s ($(left) s left)"
    mkdir -p "$out/$stage"
    timeout "$seconds" python3 -m tools.benchmark --device cuda --image-sizes 1024 --repeats 5 --warmup 2 \
        --output-dir "$out/$stage" "$@" > "$out/$stage/benchmark.log" 2>&1
    echo "exit $? ($(left) s left)"
    tail -3 "$out/$stage/benchmark.log"
}
benchmark tiny_prompt_modes 60 --model-sizes tiny --parts prompt_modes
benchmark large_inference 180 --model-sizes large --parts inference prompt_modes
benchmark large_training 150 --model-sizes large --parts training

echo "== exit of a process with persistent, pinned DataLoader workers ($(left) s left)"
for stop in no yes; do
    start=$(date +%s.%N)
    timeout 30 python3 - "$stop" <<'EOF'
import sys
from torch.utils.data import DataLoader
from scripts.engines import stop_loader_workers
loader = DataLoader(list(range(16)), batch_size=4, num_workers=2, persistent_workers=True, pin_memory=True)
for _ in loader:
    pass
if sys.argv[1] == "yes":
    stop_loader_workers(loader)
EOF
    code=$?
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "2 workers, stop_loader_workers first: $stop, exit $code after $seconds s" | tee -a "$out/exit_delay.txt"
done

python3 -m tools.prepare --dataset DRIVE --src "$drive" --output "$work/drive/datalist.json" \
    > "$out/prepare.log" 2>&1 || { cat "$out/prepare.log"; exit 1; }
bundle=(--bundle_root bundle --meta_file bundle/configs/metadata.json --logging_file bundle/configs/logging.conf
    --config_file bundle/configs/train.json)
for workers in 2 8; do
    run="$work/train_w$workers"
    seconds=$(limit 80)
    echo "== bundle trainer on DRIVE, $workers workers, $seconds s ($(left) s left)"
    start=$SECONDS
    timeout -s ABRT -k 5 "$seconds" python3 -m monai.bundle run training "${bundle[@]}" \
        --datalist "$work/drive/datalist.json" --random_init True --max_epochs 3 --val_interval 3 \
        --num_workers "$workers" --ckpt_dir "$run/models" --output_dir "$run/eval" > "$out/train_w$workers.log" 2>&1
    echo "exit $? after $((SECONDS - start)) s" | tee -a "$out/train_w$workers.log"
    cp "$run/eval/training_log.jsonl" "$out/training_log_w$workers.jsonl" 2>/dev/null
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
echo "done ($(left) s left)"
rm -rf "$work"
