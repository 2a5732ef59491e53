#!/usr/bin/env bash
# The CPU benchmark run behind benchmarks/RESULTS.md: every model in fp32 eager, then the
# two TransFER models under bf16 autocast and channels_last, and transfer_tiny under torch.compile
# (inference only).
# Usage: bash benchmarks/run_cpu.sh [OUT_DIR]
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
python benchmarks/bench_models.py --threads 2 --iters 3 --warmup 1 --train-batch-size 16 \
    --data-dir ../shared/ferplus --output-json "$out/cpu_fp32.json" | tee "$out/cpu_fp32.md"
for variant in "--dtype bf16" "--channels-last"; do
    name=$(echo "$variant" | tr -d ' -')
    python benchmarks/bench_models.py --threads 2 --iters 5 --warmup 2 --models transfer_tiny transfer_ir50 \
        --no-train --no-data $variant --output-json "$out/cpu_$name.json" | tee "$out/cpu_$name.md"
done
# torch.compile takes minutes to compile transfer_ir50 on 2 cores, so only the compact model.
python benchmarks/bench_models.py --threads 2 --iters 10 --warmup 3 --models transfer_tiny \
    --no-train --no-data --compile --output-json "$out/cpu_compile.json" | tee "$out/cpu_compile.md"
