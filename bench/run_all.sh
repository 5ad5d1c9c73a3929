#!/usr/bin/env bash
# The benchmarks of the README table: GPU settings on a CUDA machine, tiny ones on CPU. Results go to bench/results/.
#
#   bash bench/run_all.sh                    # every stage
#   bash bench/run_all.sh train-xl2 sample   # some stages (each fits in a few minutes on one H100)
#
# CUDA stages: train-xl2 train-b2 train-s2 (ceilings, then the training step: eager, compile, regional),
#              sdpa (attention backends, compiled DiT-XL/2), fp8 (dit-hf with FP8 block matmuls against
#              bf16 diffusers, compiled DiT-XL/2; needs torchao), profile (DiT-XL/2 step breakdown),
#              sample (DiT-XL/2 pipelines: eager, compile, regional, cudagraphs), loader,
#              memory (DiT-XL/2 model states and saved activations, counted; both precisions, with and without
#              gradient checkpointing).
# CPU stages:  train profile sample loader memory (the same DiT-XL/2 counts as on CUDA, CPU autocast rules).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
R=bench/results

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    all_stages="train-xl2 train-b2 train-s2 sdpa fp8 profile sample loader memory"
    on_gpu=1
else
    all_stages="train profile sample loader memory"
    on_gpu=0
fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && read -r -a stages <<<"$all_stages"

train_ref() {  # --train_json for the loader when that training result exists (stages can run alone)
    [ -f "$R/$1" ] && echo "--train_json $R/$1" || true
}

ceiling_ref() {  # --ceiling_json when train-xl2 has measured the ceilings
    [ -f "$R/$1" ] && echo "--ceiling_json $R/$1" || true
}

train_gpu() {  # $1: preset, $2: file suffix
    python bench/bench_ceiling.py --model "$1" --out "$R/ceiling-$2.json"
    python bench/bench_train.py --model "$1" --modes eager,compile,regional \
        --ceiling_json "$R/ceiling-$2.json" --out "$R/train-$2.json"
}

for stage in "${stages[@]}"; do
    echo "== $stage"
    case "$on_gpu:$stage" in
        1:train-xl2) train_gpu DiT-XL/2 xl2 ;;
        1:train-b2) train_gpu DiT-B/2 b2 ;;
        1:train-s2) train_gpu DiT-S/2 s2 ;;
        1:sdpa)
            python bench/bench_train.py --model DiT-XL/2 --impls dit-hf --modes compile \
                --sdpa auto,flash,efficient,cudnn --out "$R/train-xl2-sdpa.json" ;;
        1:fp8)
            if python -c "import torchao" 2>/dev/null; then
                # shellcheck disable=SC2046
                python bench/bench_train.py --model DiT-XL/2 --modes compile,regional --fp8 dit-hf \
                    $(ceiling_ref ceiling-xl2.json) --out "$R/train-xl2-fp8.json"
            else
                echo "fp8: skipped, torchao is not installed (pip install torchao)" >&2
            fi ;;
        1:profile) python bench/profile_step.py --modes eager,compile --out "$R/profile-xl2.json" ;;
        1:sample)
            python bench/bench_sample.py --modes eager,compile,regional,cudagraphs --out "$R/sample-xl2.json" ;;
        1:loader)
            # shellcheck disable=SC2046
            python bench/bench_loader.py --num_samples 65536 --batch_size 256 --num_workers 0 4 \
                $(train_ref train-xl2.json) --out "$R/loader.json" ;;
        0:train)
            python bench/bench_ceiling.py --out "$R/ceiling-cpu.json"
            python bench/bench_train.py --ceiling_json "$R/ceiling-cpu.json" --out "$R/train-cpu.json" ;;
        0:profile) python bench/profile_step.py --out "$R/profile-cpu.json" ;;
        0:sample) python bench/bench_sample.py --modes eager,regional --out "$R/sample-cpu.json" ;;
        0:loader)
            # shellcheck disable=SC2046
            python bench/bench_loader.py $(train_ref train-cpu.json) --out "$R/loader-cpu.json" ;;
        *:memory)
            device=$([ "$on_gpu" = 1 ] && echo cuda || echo cpu)
            for precision in fp32 bf16; do
                python bench/bench_memory.py --device $device --precision $precision \
                    --out "$R/memory-xl2-$device-$precision.json"
            done
            python bench/bench_memory.py --device $device --precision bf16 --gradient_checkpointing \
                --out "$R/memory-xl2-$device-bf16-checkpointing.json" ;;
        *)
            echo "unknown stage '$stage' on this machine; stages here: $all_stages" >&2
            exit 2 ;;
    esac
done
