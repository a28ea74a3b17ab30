#!/usr/bin/env bash
# Side by side (issue 17): sdcap in each precision mode next to diffusers/PyTorch (fp32, bf16) and
# OpenVINO (f32, bf16) on the same random SD1.5 weights, one runner after the other, then the ratios.
# Not part of CI; it installs the Python side into a throwaway venv outside the repository.
#
#   benches/side_by_side.sh [SIZE] [STEPS]        e.g. benches/side_by_side.sh 512 3
#
# Environment: $SD15 (default /tmp/sd15.safetensors, made by benches/models.sh when absent; its
# q8_0/q4_0 GGUF copies too), $VENV (default /tmp/sdcap-side-by-side-venv), $PIP_ARGS (extra pip
# arguments, e.g. a local wheel index), $TORCH_INDEX (where torch comes from; default PyPI),
# $IDLE_WAIT/$IDLE_LOAD as benches/e2e.sh.
# What runs, each in its own process, CFG batch 2 at SIZE² (latent SIZE/8):
#   sdcap   f16 file: f32, bf16; q8_0 and q4_0 files: f32, int8; and auto on each (benches/e2e.sh)
#   torch   diffusers UNet2DConditionModel from the same single file: fp32, bf16 (weights and
#           activations, torch.autocast off: the model cast with .to(torch.bfloat16)); VAE decode fp32
#   openvino  openvino.convert_model of that diffusers UNet, compiled for CPU with
#           INFERENCE_PRECISION_HINT f32 and bf16
# Every line gives mean and best s per UNet step; the summary divides each by sdcap's best mode.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${1:-512}
STEPS=${2:-3}
VENV=${VENV:-/tmp/sdcap-side-by-side-venv}
. benches/models.sh
OUT=$(mktemp -d /tmp/sdcap-side-by-side.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

cargo build --release --quiet --bin sdcap
f16=$(model_for f16 sd15)
q8=$(model_for q8_0 sd15)
q4=$(model_for q4_0 sd15)

if [[ ! -x $VENV/bin/python ]]; then
  python3 -m venv "$VENV"
  # torch from $TORCH_INDEX when set (e.g. https://download.pytorch.org/whl/cpu, CPU-only wheels),
  # else PyPI's (it pulls CUDA libraries it does not use here); diffusers reads the single file;
  # openvino converts the torch model.
  "$VENV/bin/pip" install --quiet ${PIP_ARGS:-} ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch
  "$VENV/bin/pip" install --quiet ${PIP_ARGS:-} diffusers transformers accelerate safetensors openvino
fi

echo "== side by side, ${SIZE}², $STEPS steps, CFG batch 2, $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "== CPU flags: $(grep -m1 -o -w 'avx512f\|avx512_vnni\|avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"

# sdcap: one process per (file, mode); e2e.sh prints "UNet step (batch 2) mean X s, best Y s".
{
  benches/e2e.sh "$SIZE" f16 "$STEPS" sd15 "f32 bf16 auto"
  benches/e2e.sh "$SIZE" "q8_0 q4_0" "$STEPS" sd15 "f32 int8 auto"
} | tee "$OUT/sdcap.txt"

cat > "$OUT/torch_side.py" <<'PY'
import json, os, sys, tempfile, time
import torch
from diffusers import UNet2DConditionModel, AutoencoderKL

runner, path, size, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
# SD1.5's UNet and VAE configs, written locally so nothing is fetched for them.
unet_cfg = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                attention_head_dim=8,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
               block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
cfg_dir = tempfile.mkdtemp()
for name, cfg, cls in (("unet", unet_cfg, "UNet2DConditionModel"), ("vae", vae_cfg, "AutoencoderKL")):
    os.makedirs(f"{cfg_dir}/{name}")
    json.dump(dict(cfg, _class_name=cls), open(f"{cfg_dir}/{name}/config.json", "w"))
unet = UNet2DConditionModel.from_single_file(path, config=cfg_dir, subfolder="unet").eval()
lat = size // 8
x = torch.randn(2, 4, lat, lat)
ctx = torch.randn(2, 77, 768)
t = torch.tensor([999.0, 999.0])

def timed(f):
    times = []
    for _ in range(steps):
        t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
    return sum(times) / len(times), min(times)

with torch.inference_mode():
    if runner == "torch-fp32":
        mean, best = timed(lambda: unet(x, t, encoder_hidden_states=ctx).sample)
        vae = AutoencoderKL.from_single_file(path, config=cfg_dir, subfolder="vae").eval()
        z = torch.randn(1, 4, lat, lat)
        decode, _ = timed(lambda: vae.decode(z).sample) if steps else (0, 0)
        print(f"RESULT {runner} mean {mean:.2f} best {best:.2f} decode {decode:.2f}")
    elif runner == "torch-bf16":
        u = unet.to(torch.bfloat16)
        xb, cb = x.to(torch.bfloat16), ctx.to(torch.bfloat16)
        mean, best = timed(lambda: u(xb, t, encoder_hidden_states=cb).sample)
        print(f"RESULT {runner} mean {mean:.2f} best {best:.2f}")
    else:
        import openvino as ov
        hint = "bf16" if runner == "openvino-bf16" else "f32"
        model = ov.convert_model(unet, example_input=(x, t, ctx))
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        req = compiled.create_infer_request()
        feed = [x.numpy(), t.numpy(), ctx.numpy()]
        req.infer(feed)  # first call compiles kernels; not timed
        mean, best = timed(lambda: req.infer(feed))
        print(f"RESULT {runner} mean {mean:.2f} best {best:.2f}")
PY

for runner in torch-fp32 torch-bf16 openvino-f32 openvino-bf16; do
  /usr/bin/time -f "peak RSS %M KiB" "$VENV/bin/python" "$OUT/torch_side.py" "$runner" "$f16" "$SIZE" "$STEPS" 2>&1 \
    | grep -E 'RESULT|peak RSS' | tr '\n' ' ' | tee -a "$OUT/others.txt"
  echo | tee -a "$OUT/others.txt"
done

echo "== summary: best s per UNet step (CFG batch 2), ratio = runner / sdcap's fastest"
python3 - "$OUT/sdcap.txt" "$OUT/others.txt" <<'PY'
import re, sys
rows = []
for line in open(sys.argv[1]):
    m = re.search(r"^(\S+) \d+² precision (\S+) \((\S+)\).*best ([\d.]+) s", line)
    if m:
        rows.append((f"sdcap {m.group(1)} {m.group(2)} ({m.group(3)})", float(m.group(4))))
for line in open(sys.argv[2]):
    m = re.search(r"RESULT (\S+) mean [\d.]+ best ([\d.]+)", line)
    if m:
        rows.append((m.group(1), float(m.group(2))))
fastest = min(s for name, s in rows if name.startswith("sdcap"))
for name, s in rows:
    print(f"{name:<48} {s:7.2f} s/step  {s / fastest:5.2f}x")
PY
