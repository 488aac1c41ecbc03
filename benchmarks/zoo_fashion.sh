#!/usr/bin/env bash
# Train zoo models on Fashion-MNIST with their recipes (the defaults of `xpcnn train --model`),
# one seed after another, on the CPU. Logs, per-epoch histories and wall times go to
# benchmarks/results/zoo/ (checkpoints to benchmarks/results/zoo/checkpoints/, not committed);
# benchmarks/zoo_summary.py turns them into the table of docs/models.md.
#
#     bash benchmarks/zoo_fashion.sh                   # minivgg, lenet5, simplecnn; seeds 0 1 2
#     SEEDS="0" DEVICE=cpu bash benchmarks/zoo_fashion.sh lenet5
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/zoo
mkdir -p "$OUT/checkpoints"
DEVICE=${DEVICE:-jax:cpu}
SEEDS=${SEEDS:-0 1 2}
MODELS=${*:-minivgg lenet5 simplecnn}
for model in $MODELS; do
    for seed in $SEEDS; do
        tag="fashion-$model-seed$seed"
        cmd=(xpcnn train --model "$model" --dataset fashion-mnist --device "$DEVICE"
             --input-grad col2im --seed "$seed" --no-progress
             --history "$OUT/$tag.history.json" --checkpoint "$OUT/checkpoints/$tag.ckpt")
        echo "\$ ${cmd[*]}" | tee "$OUT/$tag.log"
        start=$(date +%s)
        "${cmd[@]}" 2>&1 | tee -a "$OUT/$tag.log"
        echo "wall seconds: $(( $(date +%s) - start ))  ($(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))" \
            | tee -a "$OUT/$tag.log"
    done
done
