#!/usr/bin/env bash
# img2img.sh: full-size img2img and inpainting under a memory cgroup (issue 16's check).
#
#   benches/img2img.sh [MODEL...]      default: $SD15 (/tmp/sd15.safetensors, see models.sh)
#
# For each model: `sdcap generate` 512x512 img2img (strength 0.6) and inpaint (strength 0.75, the
# fixtures' 64x64 mask resized to 512²) from the fixtures' init picture (resized to 512²), $STEPS
# steps (default 4, so 2 and 3 steps run), uncapped and under `../shared/tools/memcap` at each of
# $CAPS (default "512M"). The page cache is dropped before each run (when root). One line per run:
# model, mode, cap, exit, OOM kills, cgroup peak MiB, sdcap's peak RSS MiB, the plan's predicted
# peak MiB, wall seconds, PNG sha256 (must be the same for every cap of a mode). The prediction must
# stay >= the measured peak. Results also go to $RESULTS (default /tmp/img2img-results.tsv).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${SDCAP_SHARED:-$here/../shared}
sdcap=$here/target/release/sdcap
caps=${CAPS:-"none 512M"}
steps=${STEPS:-4}
inputs=$shared/fixtures/tiny-sd/workflows/inputs
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

(cd "$here" && cargo build --release -q --bin sdcap)
if [[ $# -eq 0 ]]; then
  set -- "${SD15:-/tmp/sd15.safetensors}"
fi

echo "# load average at start: $(cut -d' ' -f1 /proc/loadavg) (timings on a busy machine are contended)"
printf 'model\tmode\tcap\texit\toom_kills\tcgroup_peak_mib\trss_peak_mib\tplan_peak_mib\twall_s\tpng_sha256\n' |
  tee "${RESULTS:=/tmp/img2img-results.tsv}"
for model in "$@"; do
  for mode in img2img inpaint; do
    case $mode in
      img2img) extra=(-i "$inputs/init_64x64.png" --strength 0.6) ;;
      inpaint) extra=(-i "$inputs/init_64x64.png" --mask "$inputs/mask_64x64.png" --strength 0.75) ;;
    esac
    for cap in $caps; do
      png=$out/$(basename "$model").$mode.$cap.png
      [[ $EUID -eq 0 ]] && sync && echo 1 > /proc/sys/vm/drop_caches
      args=(generate -m "$model" -p "an oil painting of a lighthouse" -W 512 -H 512 --steps "$steps" -s 42
            --progress json -o "$png" "${extra[@]}")
      set +e
      start=$(date +%s.%N)
      if [[ $cap == none ]]; then
        log=$("$sdcap" "${args[@]}" 2>&1); code=$?
        cg_peak=-; kills=0
      else
        log=$("$shared/tools/memcap" "$cap" -- "$sdcap" "${args[@]}" 2>&1); code=$?
        cg_peak=$(( $(grep -o 'peak=[0-9]*' <<<"$log" | tail -1 | cut -d= -f2) >> 20 ))
        kills=$(grep -o 'oom_kills=[0-9]*' <<<"$log" | cut -d= -f2)
      fi
      set -e
      wall=$(echo "$(date +%s.%N) - $start" | bc)
      rss=$(grep -oE '"peak_rss_mib": ?[0-9]+' <<<"$log" | tail -1 | grep -oE '[0-9]+$' || true)
      planned=$(grep -oE '"planned_mib": ?[0-9]+' <<<"$log" | tail -1 | grep -oE '[0-9]+$' || true)
      sha=$([[ -f $png ]] && sha256sum "$png" | cut -c1-16 || echo -)
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(basename "$model")" "$mode" "$cap" "$code" "$kills" \
        "$cg_peak" "${rss:--}" "${planned:--}" "$wall" "$sha" |
        tee -a "$RESULTS"
      if [[ $code -ne 0 ]]; then grep -h 'sdcap: error' <<<"$log" | sed 's/^/#   /' || true; fi
    done
  done
done
