# models.sh: sourced by the bench scripts. Full-size models with random weights in the real layouts
# (made with ../shared/tools/make-random-model when absent) and their quantized copies next to them
# (made with `sdcap quantize` when absent; needs target/release/sdcap):
#   sd15: $SD15 (default /tmp/sd15.safetensors), layout sd15.json
#   sd21: $SD21 (default /tmp/sd21.safetensors), layout sd21.json (768-v: run it with --prediction v)
#   sdxl: $SDXL (default /tmp/sdxl.safetensors), layout sdxl.json
#
#   model_for f16|q8_0|q4_0 [sd15|sd21|sdxl]     prints the model's path, making it first if needed
SD15=${SD15:-/tmp/sd15.safetensors}
SD21=${SD21:-/tmp/sd21.safetensors}
SDXL=${SDXL:-/tmp/sdxl.safetensors}
model_for() {
  local root shared base layout
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  shared=${SDCAP_SHARED:-$root/../shared}
  case ${2:-sd15} in
    sd15) base=$SD15 layout=sd15.json ;;
    sd21) base=$SD21 layout=sd21.json ;;
    sdxl) base=$SDXL layout=sdxl.json ;;
    *) echo "model_for: unknown family ${2}" >&2; return 2 ;;
  esac
  [[ -f $base ]] || "$shared/tools/make-random-model" "$shared/fixtures/layouts/$layout" "$base" >&2 || return
  case $1 in
    f16) echo "$base" ;;
    *)
      local m=${base%.safetensors}-$1.gguf
      [[ -f $m ]] || "$root/target/release/sdcap" quantize -m "$base" --type "$1" -o "$m" >&2 || return
      echo "$m" ;;
  esac
}
