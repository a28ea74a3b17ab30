#!/usr/bin/env bash
# stream.sh: what a RAM cap that forces weight streaming costs per UNet step and per VAE decode.
#
#   benches/stream.sh [REPS]      default 3 rounds
#
# CASES (default "f16:1G q8_0:512M q4_0:512M q4_0:384M") pairs a weight type with a cap under which
# `sdcap plan` streams the UNet. Each round runs `sdcap generate` 512², $STEPS steps (default 3),
# once uncapped and once under `../shared/tools/memcap CAP`, alternating so that drift in the
# machine's load hits both alike; the page cache is dropped before each run (when root), as in a
# fresh container. Per run: the median s/step of steps 2.. (step 1 also reads the weights the first
# time) and the decode's seconds, from `--progress json`. Per case: the medians over rounds and the
# capped/uncapped ratios. A capped run that does not stream, fails or is OOM-killed is reported.
# Models as in e2e.sh: $SD15 (default /tmp/sd15.safetensors) and its q8_0/q4_0 copies.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${SDCAP_SHARED:-$here/../shared}
sdcap=$here/target/release/sdcap
reps=${1:-3}
steps=${STEPS:-3}
cases=${CASES:-"f16:1G q8_0:512M q4_0:512M q4_0:384M"}
. "$here/benches/models.sh"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

(cd "$here" && cargo build --release -q --bin sdcap)
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

# One run; prints "step_s decode_s weights exit oom_kills".
run() {
  local model=$1 cap=$2 log=$out/log
  rm -f "$out/img.png"
  [[ $EUID -eq 0 ]] && sync && echo 1 > /proc/sys/vm/drop_caches
  local args=(generate -m "$model" -p "a lighthouse at dusk" -W 512 -H 512 --steps "$steps" -s 42 --progress json -o "$out/img.png")
  local code=0
  if [[ $cap == none ]]; then
    "$sdcap" "${args[@]}" > "$log" 2>&1 || code=$?
  else
    "$shared/tools/memcap" "$cap" -- "$sdcap" "${args[@]}" > "$log" 2>&1 || code=$?
  fi
  local kills
  kills=$(grep -o 'oom_kills=[0-9]*' "$log" | cut -d= -f2 || true)
  local step
  step=$(grep '"event":"step"' "$log" | grep -v '"step":1,' | grep -o '"s_per_it":[0-9.]*' | cut -d: -f2 | median)
  local decode
  decode=$(awk -F'"t":' '/"stage":"decode"/ {split($2, a, ","); d = a[1]} /"event":"summary"/ {split($2, a, ","); s = a[1]} END {if (d == "" || s == "") print "nan"; else printf "%.3f", s - d}' "$log")
  local weights
  weights=$(grep -o '"weights":"[a-z_]*"' "$log" | head -1 | cut -d'"' -f4 || true)
  echo "$step $decode ${weights:--} $code ${kills:-0}"
}

echo "# sdcap stream benchmark, $(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg), $reps rounds, $steps steps, 512x512"
printf 'model\tcap\tround\tstep_s\tdecode_s\tweights\texit\toom_kills\n'
summary=()
for case in $cases; do
  ty=${case%%:*}; cap=${case#*:}
  model=$(model_for "$ty")
  : > "$out/none"; : > "$out/cap"
  for ((r = 1; r <= reps; r++)); do
    for c in none "$cap"; do
      read -r step decode weights code kills < <(run "$model" "$c")
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ty" "$c" "$r" "$step" "$decode" "$weights" "$code" "$kills"
      if [[ $c != none && ($weights != stream || $code != 0 || $kills != 0) ]]; then
        echo "# $ty at $c: expected a streaming run that exits 0 without OOM kills" >&2
      fi
      [[ $code == 0 ]] && echo "$step $decode" >> "$out/$([[ $c == none ]] && echo none || echo cap)"
    done
  done
  ns=$(cut -d' ' -f1 "$out/none" | median); nd=$(cut -d' ' -f2 "$out/none" | median)
  cs=$(cut -d' ' -f1 "$out/cap" | median); cd_=$(cut -d' ' -f2 "$out/cap" | median)
  summary+=("$(awk -v t="$ty" -v c="$cap" -v ns="$ns" -v cs="$cs" -v nd="$nd" -v cd="$cd_" \
    'BEGIN {printf "%s\t%s\t%.2f\t%.2f\t%.3f\t%.2f\t%.2f\t%.3f", t, c, ns, cs, cs / ns, nd, cd, cd / nd}')")
done
echo
echo "# medians over rounds"
printf 'model\tcap\tstep_uncapped_s\tstep_capped_s\tstep_ratio\tdecode_uncapped_s\tdecode_capped_s\tdecode_ratio\n'
printf '%s\n' "${summary[@]}"
