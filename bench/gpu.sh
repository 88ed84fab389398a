#!/usr/bin/env bash
# One prepared GPU check of the paths a CPU cannot run (issue 22), on one GPU in at
# most 8 minutes: the step timeouts below add up to 480 s.
#
#   bash bench/gpu.sh            # from the repository root; a scratch folder per run
#
# Steps (bench/gpu/steps.py): setup (tiny shards and models), (1) codec on CUDA: GPU/CPU
# code agreement with TF32 off and on, a deterministic rerun, bf16 vs fp32; (2) the
# three fields through load_field(..., "cuda"); (3) the Ray tokenize stage: one GPU
# actor with 0 rejects, a byte-identical rerun, gpus_per_actor 0 gives CPU actors, no
# hang with actors 0; (4) codec trainer steps with adversarial losses and a resume;
# (5) an LM stage with bf16 + compile and grad accumulation: tokens/s, MFU, recompiles;
# (6) 2-rank DDP on one GPU (gloo); (7) generation and --continue on CUDA; (8) the
# w2v-BERT and MuLan trainers for a few steps. Each check prints PASS or FAIL with its
# figure; a step that runs past its timeout prints FAIL. Without CUDA every step prints
# "SKIP: no CUDA". Exit status: the number of failed steps (0: all passed or skipped).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export CANTUS_GPU_WORK=${CANTUS_GPU_WORK:-$(mktemp -d /tmp/cantus-gpu.XXXXXX)}
echo "scratch: $CANTUS_GPU_WORK"
failed=0

step() {  # step NAME SECONDS
    local name=$1 limit=$2 rc
    echo "== $name (timeout ${limit} s)"
    timeout -k 10 "$limit" "$PY" bench/gpu/steps.py "$name"
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "FAIL: $name: ran past its ${limit} s timeout"
    elif [ "$rc" -ne 0 ]; then
        echo "FAIL: $name: exit status $rc"
    fi
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step setup 60
step codec 45        # (1)
step fields 40       # (2)
step tokenize 90     # (3)
step codec_train 45  # (4)
step lm 70           # (5)
step ddp 50          # (6)
step generate 40     # (7)
step trainers 40     # (8)
echo "== $failed step(s) failed"
exit "$failed"
