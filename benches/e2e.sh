#!/usr/bin/env bash
# End-to-end benchmark: text encode (every encoder of the family), s per UNet step (CFG batch 2),
# VAE decode and peak RSS at each size and weight type, each configuration in its own process.
#
#   benches/e2e.sh [SIZES] [TYPES] [STEPS] [FAMILY] [PRECISIONS]
#       e.g. benches/e2e.sh "256 512" "f16 q8_0 q4_0" 2            (SD1.5)
#            benches/e2e.sh 512 "f16 q8_0 q4_0" 2 sd15 "f32 bf16 int8 auto"   (each precision mode;
#                the line names the mode used: int8 on f16 weights computes in f32)
#            benches/e2e.sh "512 1024" "q4_0" 2 sdxl                (SDXL)
#            benches/e2e.sh 768 "f16 q4_0" 2 sd21                   (SD2.1 768-v)
#
# Models: benches/models.sh ($SD15, $SD21, $SDXL in /tmp, made with ../shared/tools/make-random-model
# and quantized with `sdcap quantize` if absent).
# Waits up to $IDLE_WAIT seconds (default 120) for the 1-minute load average to fall below
# $IDLE_LOAD (default 0.5); if it does not, the run goes ahead and every line says CONTENDED.
# `benches/e2e.sh profile [TYPE] [LATENT] [FAMILY]` instead prints the per-op-kind profile of one
# UNet step (default f16, latent 64 = 512², sd15; e.g. `benches/e2e.sh profile q4_0 128 sdxl`).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${1:-"256 512"}
TYPES=${2:-"f16 q8_0 q4_0"}
STEPS=${3:-2}
FAMILY=${4:-sd15}
PRECISIONS=${5:-f32}
. benches/models.sh
IDLE_WAIT=${IDLE_WAIT:-120}
IDLE_LOAD=${IDLE_LOAD:-0.5}

cargo build --release --quiet --bin sdcap
cargo bench --no-run --quiet --bench e2e
bin=$(ls -t target/release/deps/e2e-* | grep -v '\.d$' | head -1)


wait_idle() {
  local waited=0 load
  while :; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" -v t="$IDLE_LOAD" 'BEGIN { exit !(l < t) }'; then
      echo "machine idle (load $load)"
      return
    fi
    if [ "$waited" -ge "$IDLE_WAIT" ]; then
      echo "CONTENDED: load average still $load on $(nproc) CPUs after ${waited}s; figures below are contended"
      return
    fi
    sleep 10
    waited=$((waited + 10))
  done
}

echo "sdcap e2e benchmark, $(date -u +%FT%TZ), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
if [ "$SIZES" = profile ]; then
  wait_idle
  "$bin" profile "$(model_for "${2:-f16}" "$FAMILY")" "${3:-64}"
  exit
fi
for size in $SIZES; do
  for ty in $TYPES; do
    for precision in $PRECISIONS; do
      wait_idle
      SDCAP_BENCH_PRECISION=$precision "$bin" stages "$(model_for "$ty" "$FAMILY")" "$size" "$STEPS"
    done
  done
done
