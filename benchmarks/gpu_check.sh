#!/usr/bin/env bash
# One-GPU check of mixed precision and the speed levers, in under 8 minutes:
#   1. the GPU tests (tests/test_gpu.py: fp16 and bf16 runs of ddfp_pascal's network on generated
#      data, channels_last and compile runs, a 2-step UniMatch run, peak memory of each;
#      tests/test_host_syncs.py: one host-device synchronisation per training step, by CUDA's detector);
#   2. `sandbox bench --levers` on recipes/ddfp_pascal.toml at the paper's crop 513 and batch 8+8
#      (4+4 when 8+8 does not fit in memory);
#      (its rows: eager float32, channels_last, compile, fp16, bf16, foreach, fused, all: fp16 vs bf16
#      vs fp32 at the paper's crop);
#   3. `sandbox bench --levers` on recipes/unimatch_pascal.toml at its own crop and batch;
#   4. the two BatchNorm synchronisations (train.sync_bn_impl "sandbox" and "torch") on 2 processes
#      sharing the GPU (benchmarks/batchnorm_classes.py: ddfp_pascal's network at crop 513, 2 images
#      per process; logits and gradients of each class against one process's plain BatchNorm on the
#      concatenated batch, within 1e-3; ms per step; syncs per step by CUDA's detector, which does not
#      see gloo's own waits);
#   5. `sandbox bench` on recipes/unimatch_v2_pascal.toml and recipes/unimatch_v2_ddfp_pascal.toml at
#      UniMatch V2's crop 518 and batch 4+4 (DINOv2-S with random weights; each against `none`);
#   6. `sandbox plan`'s predicted peak memory against torch.cuda.max_memory_allocated of the same
#      training steps run for real (benchmarks/plan_check.py: quickstart, and ddfp_pascal and
#      unimatch_pascal at crop 129 with random weights; ddfp_pascal's in fp16);
# then one summary. Logs and summary.txt go to the folder given as argument, else $OUT, else
# ./gpu_check_out.
#
#   benchmarks/gpu_check.sh [OUTPUT_FOLDER]
#   GPU_CHECK_DRY=1 benchmarks/gpu_check.sh [OUTPUT_FOLDER]   # dry run on a CPU: tiny sizes
#
# The dry run checks this script and the GPU tests on a CPU: tiny crops and batches, ResNet-18
# instead of ResNet-101, one timed step, and torch.compile disabled (TORCHDYNAMO_DISABLE=1:
# compiling on a CPU takes minutes), so its figures mean nothing. Without the dry flag and without
# a CUDA device the script stops at once.
# Each phase has a time limit (GPU_CHECK_LIMITS="tests ddfp unimatch batchnorm v2 plan" seconds; default
# 140 140 75 65 90 60 on a GPU (570 s: a lent device runs one command for at most 600 s), 900 600 600 300 600 600 in the dry run); a phase that runs out is reported as such and the
# script goes on. The exit status is 0 when every phase passed, 1 otherwise, 2 without a CUDA device.
set -u -o pipefail

cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
dry="${GPU_CHECK_DRY:-0}"

if [ "$dry" = 1 ]; then
    export SANDBOX_GPU_TESTS_ON_CPU=1 TORCHDYNAMO_DISABLE=1
    bench_steps=(--steps 1 --warmup 0)
    tiny=(--set train.crop_size=33 --set backbone.model=resnet18)
    ddfp_sizes=("${tiny[@]}" --set train.batch_size=2 --set train.unlabeled_batch_size=2)
    ddfp_fallback=("${tiny[@]}" --set train.batch_size=1 --set train.unlabeled_batch_size=1)
    unimatch_sizes=("${tiny[@]}")
    batchnorm_sizes=(--set backbone.model=resnet18 --crop 33 --batch 2 --steps 1 --warmup 0)
    v2_sizes=(--set train.crop_size=28 --set train.batch_size=2 --set train.unlabeled_batch_size=2)
    plan_configuration=(recipes/quickstart.toml --set train.crop_size=32)
    mode="dry run on the CPU (tiny sizes, compile disabled: figures mean nothing)"
    limits="900 600 600 300 600 600"
else
    if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine," \
            "or set GPU_CHECK_DRY=1 for a dry run on the CPU" >&2
        exit 2
    fi
    bench_steps=(--steps 5 --warmup 3)
    ddfp_sizes=(--set train.crop_size=513 --set train.batch_size=8 --set train.unlabeled_batch_size=8)
    ddfp_fallback=(--set train.crop_size=513 --set train.batch_size=4 --set train.unlabeled_batch_size=4)
    unimatch_sizes=()
    batchnorm_sizes=(--crop 513 --batch 2 --steps 3 --warmup 1)
    v2_sizes=(--set train.crop_size=518 --set train.batch_size=4 --set train.unlabeled_batch_size=4)
    plan_configuration=()  # its three configurations
    mode="$("$python" -c 'import torch; print(torch.cuda.get_device_name(0))')"
    limits="140 140 75 65 90 60"
fi
read -r limit_tests limit_ddfp limit_unimatch limit_batchnorm limit_v2 limit_plan <<< "${GPU_CHECK_LIMITS:-$limits}"
limit_plan="${limit_plan:-${limits##* }}"  # five limits given: the plan check's default
synthetic=(--num-classes 21 --set backbone.weights=none)  # synthetic data and random weights: nothing to download

# run NAME LIMIT COMMAND...: COMMAND's output in $out/NAME.log; its status in $out/NAME.status
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee "$out/$name.log"
    local start=$SECONDS
    timeout "$limit" "$@" >> "$out/$name.log" 2>&1
    local status=$?
    local verdict=ok
    if [ "$status" = 124 ]; then
        verdict="TIMEOUT after ${limit}s"
    elif [ "$status" != 0 ]; then
        verdict="FAILED (exit $status)"
    fi
    echo "$verdict, $((SECONDS - start)) s" > "$out/$name.status"
    echo "   $verdict, $((SECONDS - start)) s"
    return "$status"
}

# -n 0: one process (not pytest-xdist's workers): the tests share one device and print what they measured (-s).
run gpu_tests "$limit_tests" "$python" -m pytest -q -s -n 0 -m gpu tests/test_gpu.py tests/test_host_syncs.py -p no:cacheprovider
ddfp_start=$SECONDS
run ddfp_levers "$limit_ddfp" "$python" -m sandbox bench recipes/ddfp_pascal.toml --levers "${synthetic[@]}" \
    "${bench_steps[@]}" "${ddfp_sizes[@]}"
if [ "$?" != 0 ] && grep -qi "out of memory" "$out/ddfp_levers.log"; then  # the smaller batch, in the time left
    mv "$out/ddfp_levers.log" "$out/ddfp_levers_first_try.log"
    left=$((limit_ddfp - (SECONDS - ddfp_start)))
    run ddfp_levers "$((left > 30 ? left : 30))" "$python" -m sandbox bench recipes/ddfp_pascal.toml --levers \
        "${synthetic[@]}" "${bench_steps[@]}" "${ddfp_fallback[@]}"
fi
run unimatch_levers "$limit_unimatch" "$python" -m sandbox bench recipes/unimatch_pascal.toml --levers \
    "${synthetic[@]}" "${bench_steps[@]}" "${unimatch_sizes[@]}"
run batchnorm "$limit_batchnorm" "$python" -m torch.distributed.run --standalone --nproc_per_node 2 \
    benchmarks/batchnorm_classes.py recipes/ddfp_pascal.toml --set backbone.weights=none "${batchnorm_sizes[@]}"
# UniMatch V2 and DDFP inside it, one command so that one time limit covers both
run v2 "$limit_v2" bash -c '"$0" -m sandbox bench recipes/unimatch_v2_pascal.toml "${@}" &&
    "$0" -m sandbox bench recipes/unimatch_v2_ddfp_pascal.toml "${@}"' "$python" --num-classes 21 \
    --set model.weights=none "${bench_steps[@]}" "${v2_sizes[@]}"
run plan_check "$limit_plan" "$python" benchmarks/plan_check.py "${plan_configuration[@]}"

{
    echo "gpu_check: $mode"
    for name in gpu_tests ddfp_levers unimatch_levers batchnorm v2 plan_check; do
        echo "$name: $(cat "$out/$name.status")"
    done
    if [ -e "$out/ddfp_levers_first_try.log" ]; then
        echo "note: the first ddfp batch did not fit in memory (ddfp_levers_first_try.log):" \
            "its table is of the smaller one"
    fi
    echo
    echo "GPU tests: $(grep -E '(passed|failed|skipped|error)' "$out/gpu_tests.log" | tail -n 1)"
    grep '^peak memory:' "$out/gpu_tests.log" || true
    for name in ddfp_levers unimatch_levers; do
        echo
        if grep -q 'speed levers:' "$out/$name.log"; then
            sed -n '/speed levers:/,$p' "$out/$name.log"
        else  # cut short: the rows measured before
            echo "$name: no table; rows measured:"
            grep '^measured ' "$out/$name.log" || echo "  none"
        fi
    done
    echo
    sed -n '/^batchnorm classes:/,/^logits and gradients/p' "$out/batchnorm.log"
    echo
    grep -E 'training step:|perturbation|complementary|ddfp|none' "$out/v2.log" | grep -v '^==' || echo "v2: no table"
    echo
    sed -n '/^plan check on/,$p' "$out/plan_check.log" | grep -E '^(plan check|\|)' || echo "plan_check: no table"
} > "$out/summary.txt"
cat "$out/summary.txt"
if grep -q -v ': ok, ' <(grep -E '^(gpu_tests|ddfp_levers|unimatch_levers|batchnorm|v2|plan_check): ' "$out/summary.txt"); then
    exit 1
fi
