#!/usr/bin/env bash
# Prove makd's CUDA paths on the first machine with a GPU, in a few minutes: one line per check, no network, no
# download (tiny random models made on the spot, Fashion-MNIST from its Debian package). Given only the repository
# (`make setup` installs the locked wheels). Without a GPU it says so in one line and exits 0.
#
#   scripts/gpu_check.sh            # every check (about 5 minutes on one GPU)
#   scripts/gpu_check.sh hf train   # only the checks whose names contain these words
#
# Exit status: 0 when every check passed (or no GPU), 1 when one failed (its line says FAIL and why; the full output
# of every check is kept in $GPU_CHECK_LOG, default /tmp/makd-gpu-check.log). docs/training.md describes the checks.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${GPU_CHECK_LOG:-/tmp/makd-gpu-check.log}
# GPU_CHECK_PYTHON: an environment that already has makd and its test extra (the test suite's); otherwise the
# repository's .venv, made or brought up to the lock by `make setup data` (the locked wheels, Fashion-MNIST).
PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
if [ -z "${GPU_CHECK_PYTHON:-}" ]; then
    make -s setup data >/dev/null || { echo "gpu_check: FAIL setup (make setup data)"; exit 1; }
fi
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    torch_version=$($PY -c 'import torch; print(torch.__version__, "built for CUDA", torch.version.cuda)')
    if [ -e /dev/nvidia0 ] || nvidia-smi -L >/dev/null 2>&1; then  # a GPU that this torch cannot use
        driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
        echo "gpu_check: FAIL a GPU is present (driver ${driver:-unknown}) but torch $torch_version cannot use it: update the NVIDIA driver or CUDA_VISIBLE_DEVICES"
        exit 1
    fi
    echo "gpu_check: no CUDA GPU on this machine (torch $torch_version sees none): nothing to check"
    exit 0
fi
$PY -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {torch.cuda.device_count()} GPU(s), {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')"
: > "$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
failed=0
wanted=("$@")

# check NAME SECONDS COMMAND...: runs COMMAND (its output to the log), prints PASS/FAIL with the command's last line.
check() {
    local name=$1 limit=$2
    shift 2
    if [ ${#wanted[@]} -gt 0 ]; then
        local match=0 w
        for w in "${wanted[@]}"; do [[ $name == *"$w"* ]] && match=1; done
        [ $match = 1 ] || return 0
    fi
    local start=$SECONDS out status
    out=$(timeout "$limit" "$@" 2>&1)
    status=$?
    { echo "== $name: $*"; echo "$out"; } >> "$LOG"
    local last
    last=$(printf '%s\n' "$out" | grep -v '^\s*$' | tail -n 1)
    if [ $status = 0 ]; then
        printf 'PASS %-22s %4ds  %s\n' "$name" $((SECONDS - start)) "$last"
    else
        [ $status = 124 ] && last="timed out after ${limit}s"
        printf 'FAIL %-22s %4ds  %s\n' "$name" $((SECONDS - start)) "$last"
        failed=1
    fi
}

# A tiny labelling and training setting for the launcher checks: 20 Fashion-MNIST images per class, the bridge teacher.
cat > "$WORK/tiny.yaml" <<EOF
name: gpu-check
out: $WORK/run
questions: makd:fashion_mnist/questions.json
data: {dataset: fashion_mnist, train_per_class: 20, val_per_class: 5, test_per_class: 20}
labels: {path: $WORK/labels, splits: [train, test], shard_size: 64}
model: {name: resnet8, width: 16}
train: {epochs: 2, batch_size: 64, eval_every: 1, progress: false, tensorboard: false}
EOF
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1 -m makd"
# Labels for the launcher checks, made by the first check that needs them (torchrun-label, or torchrun-train alone).
LABEL="$TORCHRUN label -c $WORK/tiny.yaml > $WORK/label.log 2>&1; status=\$?; cat $WORK/label.log; [ \$status = 0 ]"

# Training: bf16 and fp16 autocast steps (finite, the loss falls), channels-last, torch.compile against eager.
check train-bf16 300 $PY scripts/gpu_train_checks.py amp-bf16
check train-fp16 300 $PY scripts/gpu_train_checks.py amp-fp16
check train-channels-last 300 $PY scripts/gpu_train_checks.py channels-last
check train-compile 420 $PY scripts/gpu_train_checks.py compile
check detection-step 300 $PY scripts/gpu_train_checks.py detection
# torchrun with LOCAL_RANK: labelling and training take cuda:0 (the log line names the device each process took).
check torchrun-label 300 bash -c "$LABEL && grep -q 'device: cuda:0 for process 0 of 1' $WORK/label.log && $TORCHRUN labels check $WORK/labels"
check torchrun-train 300 bash -c "{ [ -f $WORK/labels/labels.json ] || { $LABEL; }; } && $TORCHRUN train -c $WORK/tiny.yaml && $PY -c \"import json; r = json.load(open('$WORK/run/results.json')); print('test top-1', r['test_top1_last'])\""
# The hf teacher on CUDA equal to the CPU reference (tiny VLMs of 3 architectures), then its images/s.
check hf-teacher-cuda 480 $PY benchmarks/label_pipeline.py --device cuda --workers 4 --rounds 1
# Stacked seeds (executor.batch_seeds) against separate runs: runs per hour.
check stacked-seeds 480 $PY benchmarks/cheap_seeds.py --seeds 4 --epochs 10 --arms sequential stacked --headline stacked
# The input pipeline: makd's loader against bare torchvision on generated JPEGs, batches copied to the GPU.
check input-pipeline 600 $PY benchmarks/input_pipeline.py --device cuda

echo "gpu_check: $([ $failed = 0 ] && echo 'every check passed' || echo 'a check FAILED'); full output: $LOG"
exit $failed
