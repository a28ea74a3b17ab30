#!/usr/bin/env bash
# TAESD decode vs the VAE decode (issue 16): best time of REPEATS and peak RSS, each decoder and
# size in its own process, on the SD1.5 layout (the model's VAE, f16 as the file holds it).
#
#   benches/taesd.sh [SIZES] [REPEATS]        e.g. benches/taesd.sh "512 1024" 3
#
# The TAESD is random-weight at full size ($TAESD, default /tmp/taesd-random/, made by
# `cargo bench --bench taesd -- make DIR` when absent: the real architecture, F32 like the real
# downloads). The model: $SD15 via benches/models.sh. Waits for an idle machine as e2e.sh does
# ($IDLE_WAIT, $IDLE_LOAD); every line says CONTENDED if it was not.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${1:-"512 1024"}
REPEATS=${2:-3}
TAESD=${TAESD:-/tmp/taesd-random}
. benches/models.sh
IDLE_WAIT=${IDLE_WAIT:-120}
IDLE_LOAD=${IDLE_LOAD:-0.5}

cargo build --release --quiet --bin sdcap
cargo bench --no-run --quiet --bench taesd
bin=$(ls -t target/release/deps/taesd-* | grep -v '\.d$' | head -1)
[[ -f $TAESD/taesd_decoder.safetensors ]] || "$bin" make "$TAESD"
model=$(model_for f16 sd15)

wait_idle() {
  local waited=0 load
  while :; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" -v t="$IDLE_LOAD" 'BEGIN { exit !(l < t) }'; then return; fi
    if [ "$waited" -ge "$IDLE_WAIT" ]; then
      echo "CONTENDED: load average still $load on $(nproc) CPUs after ${waited}s"
      return
    fi
    sleep 10
    waited=$((waited + 10))
  done
}

echo "sdcap TAESD vs VAE decode, $(date -u +%FT%TZ), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for size in $SIZES; do
  for which in vae taesd; do
    wait_idle
    "$bin" decode "$which" "$model" "$TAESD/taesd_decoder.safetensors" "$size" "$REPEATS"
  done
done
