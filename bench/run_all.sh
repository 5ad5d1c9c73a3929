#!/usr/bin/env bash
# All benchmarks with the settings of the README table: the GPU settings on a CUDA machine, tiny ones on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    for model in DiT-XL/2 DiT-B/2 DiT-S/2; do
        name=$(echo "$model" | tr -d '/-' | tr 'A-Z' 'a-z')
        python bench/bench_train.py --model "$model" --modes eager,compile,regional --out "bench/results/train-$name.json"
    done
    python bench/bench_sample.py --modes eager,compile --out bench/results/sample-xl2.json
    python bench/bench_loader.py --num_samples 65536 --batch_size 256 --num_workers 0 4 \
        --train_json bench/results/train-ditxl2.json --out bench/results/loader.json
else
    python bench/bench_train.py --out bench/results/train-cpu.json
    python bench/bench_sample.py --out bench/results/sample-cpu.json
    python bench/bench_loader.py --train_json bench/results/train-cpu.json --out bench/results/loader-cpu.json
fi
