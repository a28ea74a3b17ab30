#!/bin/bash
# Slurm job array: 4 tasks share one batch; task i runs the jobs j with j mod 4 == i (sdcap reads
# SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT itself).
#
#   sbatch swap-guide/slurm-array.sh                      # or: JOBS=... OUT=... sbatch ...
#
# Resubmit the same script after a time-out, a node failure or a fix to a bad job line: finished
# images are skipped, so each task resumes where it stopped.
#SBATCH --job-name=sdcap
#SBATCH --array=0-3
#SBATCH --cpus-per-task=2
#SBATCH --mem=6G
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@180
#SBATCH --output=sdcap-%A_%a.log
#
# --mem: a 512x512 SD 1.5 job plans 1.83 GiB and peaked at 1.84 GiB (README.md in this folder);
# 6G leaves room for larger images.
# --signal=B:TERM@180: SIGTERM to this script (which `exec`s sdcap) 3 minutes before the time
# limit; sdcap abandons the image in progress at the next step, records it and exits 130.
set -euo pipefail

JOBS=${JOBS:-$HOME/sdcap/jobs.jsonl}
MODEL=${MODEL:-$HOME/models/v1-5-pruned-emaonly.safetensors}
OUT=${OUT:-$HOME/sdcap/out}

exec sdcap batch "$JOBS" -m "$MODEL" --out "$OUT" \
  --threads "${SLURM_CPUS_PER_TASK:-2}" --progress json
