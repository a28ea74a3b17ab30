#!/usr/bin/env bash
# LoRA benchmark (issue 15): full-size SD1.5, a rank-RANK LoRA on every attention and ResNet layer
# (benches/make_lora.py, made next to the model when absent): load + apply time, and s per UNet
# step (CFG batch 2) with and without it, alternating, on each weight type. Targets: load + apply
# under 1 s, s/step within 5% of no LoRA. Each precision mode of MODES in turn (`auto`: what a job
# gets by default on this CPU, bf16 with AMX tiles, else f32). The medians of the alternating calls
# are the figures to quote (the best of each is printed next to them).
#
#   benches/lora.sh [SIZE=512] [TYPES="q4_0"] [STEPS=5] [RANK=32] [MODES="auto"]
#
# Models from benches/models.sh. Waits for an idle machine as benches/e2e.sh does (IDLE_WAIT,
# IDLE_LOAD); on a shared machine quote the CPU-seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${1:-512}
TYPES=${2:-q4_0}
STEPS=${3:-5}
RANK=${4:-32}
MODES=${5:-auto}
. benches/models.sh
IDLE_WAIT=${IDLE_WAIT:-120}
IDLE_LOAD=${IDLE_LOAD:-0.5}

cargo build --release --quiet --bin sdcap
cargo bench --no-run --quiet --bench e2e
bin=$(ls -t target/release/deps/e2e-* | grep -v '\.d$' | head -1)
lora=${SD15%.safetensors}-lora-r$RANK.safetensors
[[ -f $lora ]] || python3 benches/make_lora.py "$SD15" "$lora" "$RANK"

echo "sdcap LoRA benchmark, $(date -u +%FT%TZ), $(nproc) CPUs"
for ty in $TYPES; do
for mode in $MODES; do
  waited=0
  while ! awk -v l="$(cut -d' ' -f1 /proc/loadavg)" -v t="$IDLE_LOAD" 'BEGIN { exit !(l < t) }'; do
    if [ "$waited" -ge "$IDLE_WAIT" ]; then echo "CONTENDED: load $(cut -d' ' -f1 /proc/loadavg)"; break; fi
    sleep 10; waited=$((waited + 10))
  done
  SDCAP_BENCH_PRECISION=$mode "$bin" lora "$(model_for "$ty" sd15)" "$lora" "$SIZE" "$STEPS"
done
done
