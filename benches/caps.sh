#!/usr/bin/env bash
# caps.sh: full-size runs under real memory cgroups (issue 4's check).
#
#   benches/caps.sh [MODEL...]      default: /tmp/sd15-q4_0.gguf /tmp/sd15-q8_0.gguf
#
# Makes the models if missing (../shared/tools/make-random-model, then `sdcap quantize`), then for each
# model runs `sdcap generate` at 512x512, 2 steps, under memcap at each cap (and uncapped), with
# --threads 1 and 2. Before each run the page cache is dropped (when root) so the cgroup is charged for
# the weights it reads, as a fresh container would be. Prints one line per run: model, cap, threads,
# exit code, OOM kills, cgroup peak MiB, sdcap's peak RSS MiB, weight residency, wall seconds, PNG sha256 — the PNGs
# must be identical across caps and thread counts. Results also go to benches/caps-results.tsv.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${SDCAP_SHARED:-$here/../shared}
sdcap=$here/target/release/sdcap
caps=${CAPS:-"none 4G 2G 1G 768M 512M 384M 256M 64M"}
steps=${STEPS:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

(cd "$here" && cargo build --release -q)
if [[ $# -eq 0 ]]; then
  . "$here/benches/models.sh"
  set -- "$(model_for q4_0)" "$(model_for q8_0)"
fi

load=$(cut -d' ' -f1 /proc/loadavg)
echo "# load average at start: $load (2-core machine; above ~0.5 the timings are contended)"
printf 'model\tcap\tthreads\texit\toom_kills\tcgroup_peak_mib\trss_peak_mib\tweights\twall_s\tpng_sha256\n' | tee "$here/benches/caps-results.tsv"
for model in "$@"; do
  for cap in $caps; do
    for threads in 2 1; do
      # One thread is slow: compare thread counts at the tightest caps only.
      [[ $threads == 1 && $cap != 512M && $cap != none ]] && continue
      png=$out/$(basename "$model").$cap.$threads.png
      [[ $EUID -eq 0 ]] && sync && echo 1 > /proc/sys/vm/drop_caches
      args=(generate -m "$model" -p "a lighthouse at dusk" -W 512 -H 512 --steps "$steps" -s 42 -t "$threads" --progress none -o "$png")
      set +e
      if [[ $cap == none ]]; then
        log=$( { /usr/bin/time -f "wall=%e" "$sdcap" "${args[@]}"; } 2>&1 ); code=$?
        cg_peak=-; kills=0
      else
        log=$("$shared/tools/memcap" "$cap" -- "$sdcap" "${args[@]}" 2>&1); code=$?
        cg_peak=$(( $(grep -o 'peak=[0-9]*' <<<"$log" | tail -1 | cut -d= -f2) >> 20 ))
        kills=$(grep -o 'oom_kills=[0-9]*' <<<"$log" | cut -d= -f2)
      fi
      set -e
      wall=$(grep -oE 'wall(_s)?=[0-9.]+' <<<"$log" | tail -1 | cut -d= -f2 || true)
      rss=$(grep -o 'peak RSS [0-9]*' <<<"$log" | awk '{print $3}' || true)
      plan=$(grep -oE 'weights: [A-Za-z]+' <<<"$log" | cut -d' ' -f2 || true)
      sha=$([[ -f $png ]] && sha256sum "$png" | cut -c1-16 || echo -)
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(basename "$model")" "$cap" "$threads" "$code" "$kills" \
        "$cg_peak" "${rss:--}" "${plan:--}" "$wall" "$sha" | tee -a "$here/benches/caps-results.tsv"
      if [[ $code -ne 0 ]]; then grep -h 'sdcap: error' <<<"$log" | sed 's/^/#   /' || true; fi
    done
  done
done
