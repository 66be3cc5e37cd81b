#!/usr/bin/env bash
# The GPU figures still missing from docs/performance.md, in one run, for a GPU lent for minutes. Two H200 runs
# (2026-11-29, 2026-11-30) measured the benchmark's inference, training and prompt modes at Hiera-tiny and
# Hiera-large, 1024 px, and the trainer on DRIVE. This run measures, in order:
#   1. the training step and peak memory at Hiera-large with torch.compile (LoRA / full fine-tuning / LoRA +
#      compile; the compilation outlasted its 150 s stage before);
#   2. the prompt modes at Hiera-tiny and Hiera-large (the metrics' KD-tree queries now share the cores their jobs
#      leave, which no GPU machine has run);
#   3. the bundle's own trainer on real DRIVE (Hiera-large, 1024 px, the paper's recipe, random weights) with 2 and
#      8 DataLoader workers: images per second sustained, data loading included, and the share of that time spent
#      waiting for batches (training_log.jsonl); where each iteration goes (ignite's HandlersTimeProfiler: waiting
#      for the batch, the step, each handler; profile_w*.json); and how long the process takes to exit once the run
#      has finished (a run still alive at its limit gets SIGABRT, and Python's faulthandler prints where every
#      thread waits).
# For every figure at once (not timed on a GPU yet; the CPU backends' exports alone take minutes):
# python3 -m tools.benchmark --device cuda --model-sizes tiny large --image-sizes 1024
# Each stage has its own time limit, so one that overruns leaves the others their time; the benchmark rewrites
# benchmark.partial.json after each measurement, so a stopped stage keeps what it measured.
#
# Usage: bash tools/gpu_figures.sh DRIVE_DIR OUTPUT_DIR [SECONDS]   (SECONDS: the whole run's budget, default 560)
# On a machine whose image has torch alone, install the wheels first (built here with `pip wheel --no-deps` for
# sam2 with SAM2_BUILD_CUDA=0, iopath, antlr4-python3-runtime, monai, pytorch-ignite, hydra-core, omegaconf,
# nibabel), e.g. `pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site`;
# it stops at once, measuring nothing, where an import fails or torch sees no CUDA device.
# OUTPUT_DIR receives small files (logs, JSON, Markdown) in one folder per stage; checkpoints go to a temporary one.
set -uo pipefail
cd "$(dirname "$0")/.."

drive=${1:?DRIVE folder (training/, test/) first}
out=${2:?output folder second}
budget=${3:-560}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
ulimit -c 0  # a SIGABRT at a stage's limit must not write a CUDA process's core into the checkout

left() { echo $((budget - SECONDS)); }
# The smaller of a stage's own limit and the time left, less 15 s: 10 s for a stage that ignores its SIGABRT until
# it is killed (timeout -k 10), 5 s to write up.
limit() { local rest=$(( $(left) - 15 )); echo $(( $1 < rest ? $1 : rest )); }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import os, torch, monai, sam2, ignite, hydra, scripts.network, tools.benchmark; \
assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__, 'cpus', os.cpu_count())"
} > "$out/machine.txt" 2>&1
status=$?
cat "$out/machine.txt"
[ $status -eq 0 ] || { echo "the environment is not complete (above): nothing measured"; exit 2; }
# The datalist first: a wrong DRIVE folder is found before minutes of GPU time are spent.
timeout 60 python3 -m tools.prepare --dataset DRIVE --src "$drive" --output "$work/drive/datalist.json" \
    > "$out/prepare.log" 2>&1 || { cat "$out/prepare.log"; exit 1; }

benchmark() {  # benchmark STAGE SECONDS ARGUMENTS...
    local stage=$1 seconds; seconds=$(limit "$2"); shift 2
    [ "$seconds" -gt 0 ] || { echo "== benchmark $stage skipped: no time left"; return; }
    echo "== benchmark $stage, $seconds s ($(left) s left)"
    mkdir -p "$out/$stage"
    # SIGABRT: faulthandler prints where a stage stopped at its limit (a compilation?); -k: killed if it hangs on.
    timeout -s ABRT -k 10 "$seconds" python3 -m tools.benchmark --device cuda --image-sizes 1024 --repeats 5 \
        --warmup 2 --output-dir "$out/$stage" "$@" > "$out/$stage/benchmark.log" 2>&1
    echo "exit $? ($(left) s left)"
    tail -3 "$out/$stage/benchmark.log"
}
benchmark large_training_compile 240 --model-sizes large --parts training --switches compile
benchmark prompt_modes 100 --model-sizes tiny large --parts prompt_modes

for workers in 2 8; do
    run="$work/train_w$workers"
    seconds=$(limit 80)
    [ "$seconds" -gt 0 ] || { echo "== bundle trainer, $workers workers, skipped: no time left"; continue; }
    echo "== bundle trainer on DRIVE, $workers workers, $seconds s ($(left) s left)"
    start=$SECONDS
    # The bundle's training workflow (as `monai.bundle run training` runs it) under ignite's HandlersTimeProfiler,
    # which splits each iteration into waiting for the batch ("Dataflow"), the step ("Processing") and each handler.
    timeout -s ABRT -k 5 "$seconds" python3 - "$work/drive/datalist.json" "$run" "$workers" "$out/profile_w$workers.json" \
        > "$out/train_w$workers.log" 2>&1 <<'EOF'
import json, sys
from ignite.handlers import HandlersTimeProfiler
from monai.bundle import ConfigWorkflow
datalist, run, workers, table = sys.argv[1:5]
workflow = ConfigWorkflow(
    config_file="bundle/configs/train.json", meta_file="bundle/configs/metadata.json",
    logging_file="bundle/configs/logging.conf", workflow_type="train", run_id="training", init_id="initialize",
    final_id="finalize", bundle_root="bundle", datalist=datalist, random_init=True, max_epochs=3, val_interval=3,
    num_workers=int(workers), ckpt_dir=f"{run}/models", output_dir=f"{run}/eval")
workflow.initialize()
trainer = workflow.parser.get_parsed_content("train#trainer")
import torch
from ignite.engine import Events
def wait_for_the_gpu(engine):
    torch.cuda.synchronize()
# First of the iteration's handlers: the step's GPU time is its own row ("wait_for_the_gpu"), not charged to the
# first handler that reads a value (the training log's float(loss)). ignite keeps no public way to go first.
trainer._event_handlers[Events.ITERATION_COMPLETED].insert(0, (wait_for_the_gpu, (trainer,), {}))
profiler = HandlersTimeProfiler()
profiler.attach(trainer)
workflow.run()
workflow.finalize()
results = profiler.get_results()
profiler.print_results(results)
with open(table, "w") as file:
    json.dump(results, file)
EOF
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
