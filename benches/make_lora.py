#!/usr/bin/env python3
"""A random kohya-ss LoRA (LDM UNet names, LoCon convs) for benchmarks: rank R on every attention
layer (attn1/attn2 to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2) and
every ResNet layer (conv1, conv2, time_emb_proj, conv_shortcut) of an SD1.x/SD2.x/SDXL single-file
checkpoint. Only the checkpoint's header is read. Needs numpy (writes safetensors by hand).

    benches/make_lora.py CHECKPOINT OUT [RANK=32] [ALPHA=RANK]
    e.g. benches/make_lora.py /tmp/sd15.safetensors /tmp/sd15-lora-r32.safetensors 32
"""
import json
import re
import struct
import sys

import numpy as np

ATTENTION = re.compile(
    r"\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)\.weight$")
# LDM ResNet: in_layers.2 = conv1, out_layers.3 = conv2, emb_layers.1 = time_emb_proj, skip_connection.
RESNET = re.compile(r"\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)\.weight$")
PREFIX = "model.diffusion_model."


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def main():
    src, out = sys.argv[1], sys.argv[2]
    rank = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    alpha = float(sys.argv[4]) if len(sys.argv) > 4 else float(rank)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, info in sorted(header(src).items()):
        if name == "__metadata__" or not name.startswith(PREFIX):
            continue
        if not (ATTENTION.search(name) or RESNET.search(name)):
            continue
        shape = info["shape"]
        module = "lora_unet_" + name[len(PREFIX):-len(".weight")].replace(".", "_")
        out_dim, in_dim = shape[0], shape[1]
        kernel = shape[2:] if len(shape) == 4 else []
        down_shape = [rank, in_dim] + kernel
        up_shape = [out_dim, rank] + ([1, 1] if kernel else [])
        fan_in = int(np.prod(down_shape[1:]))
        tensors[module + ".lora_down.weight"] = (
            rng.standard_normal(down_shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float16)
        tensors[module + ".lora_up.weight"] = (
            rng.standard_normal(up_shape, dtype=np.float32) * 0.01).astype(np.float16)
        tensors[module + ".alpha"] = np.array(alpha, dtype=np.float16)
    meta, offset = {"__metadata__": {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}}, 0
    for name, t in tensors.items():
        meta[name] = {"dtype": "F16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(meta).encode()
    head += b" " * (-len(head) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t in tensors.values():
            f.write(t.tobytes())
    modules = len(tensors) // 3
    print(f"{out}: {modules} modules, rank {rank}, alpha {alpha}, {offset / 2**20:.1f} MiB of tensors")


if __name__ == "__main__":
    main()
