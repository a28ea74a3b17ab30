# models.sh: sourced by the bench scripts. The full-size SD1.5 model with random weights ($SD15, default
# /tmp/sd15.safetensors, made with ../shared/tools/make-random-model when absent) and its quantized
# copies next to it (made with `sdcap quantize` when absent; needs target/release/sdcap).
#
#   model_for f16|q8_0|q4_0     prints the model's path, making it first if needed
SD15=${SD15:-/tmp/sd15.safetensors}
model_for() {
  local root shared
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  shared=${SDCAP_SHARED:-$root/../shared}
  [[ -f $SD15 ]] || "$shared/tools/make-random-model" "$shared/fixtures/layouts/sd15.json" "$SD15" >&2 || return
  case $1 in
    f16) echo "$SD15" ;;
    *)
      local m=${SD15%.safetensors}-$1.gguf
      [[ -f $m ]] || "$root/target/release/sdcap" quantize -m "$SD15" --type "$1" -o "$m" >&2 || return
      echo "$m" ;;
  esac
}
