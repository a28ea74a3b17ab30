#!/usr/bin/env python3
"""Makes tests/pil/: PIL (Pillow) references for `sdcap::init_image` (tests/init_image.rs).

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install pillow numpy
    /tmp/venv/bin/python tests/pil/make_pil_refs.py FIXTURES   # the shared fixtures folder

Reads the workflow inputs (tiny-sd/workflows/inputs/) and writes, next to this script:
* pil_refs.safetensors (U8 tensors [H, W, C] or [H, W]):
  - `init_64x96_to_WxH`: Image.resize((W, H), LANCZOS) of init_64x96.png, as diffusers'
    VaeImageProcessor.resize does for an image;
  - `mask_64x64_to_WxH`: mask_64x64.png resized the same way in mode "L" (before binarising);
  - `mask_rgb_L`: mask_rgb.png converted to "L" (PIL's ITU-R 601 integer formula);
  - `orient6_png`: ImageOps.exif_transpose of orient6.png (what the picture shows).
* mask_rgb.png: a coloured 64x64 mask, to check the conversion to grey.
* orient6.png (RGB 16x24 stored, EXIF orientation 6 in an eXIf chunk: shows 24x16) and
  orient1.jpg / orient6.jpg (the same JPEG scan, without and with an EXIF orientation 6 APP1).
* rgba.png (RGBA; PIL's convert("RGB") drops alpha) and grey16.png (16-bit grey).
"""
import json
import os
import struct
import sys

import numpy as np
from PIL import Image, ImageOps

HERE = os.path.dirname(os.path.abspath(__file__))
fixtures = sys.argv[1]
inputs = os.path.join(fixtures, "tiny-sd", "workflows", "inputs")
out = {}

init = Image.open(os.path.join(inputs, "init_64x96.png")).convert("RGB")
for w, h in [(40, 56), (80, 128), (64, 72), (48, 96), (24, 16)]:
    out[f"init_64x96_to_{w}x{h}"] = np.asarray(init.resize((w, h), resample=Image.LANCZOS))
mask = Image.open(os.path.join(inputs, "mask_64x64.png")).convert("L")
for w, h in [(40, 40), (96, 80)]:
    out[f"mask_64x64_to_{w}x{h}"] = np.asarray(mask.resize((w, h), resample=Image.LANCZOS))

yy, xx = np.mgrid[0:64, 0:64]
rgb = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
Image.fromarray(rgb, "RGB").save(os.path.join(HERE, "mask_rgb.png"))
out["mask_rgb_L"] = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))

small = init.resize((16, 24), resample=Image.LANCZOS)
exif = Image.Exif()
exif[0x0112] = 6
small.save(os.path.join(HERE, "orient6.png"), exif=exif.tobytes())
out["orient6_png"] = np.asarray(ImageOps.exif_transpose(Image.open(os.path.join(HERE, "orient6.png"))).convert("RGB"))
small.save(os.path.join(HERE, "orient1.jpg"), quality=90)
small.save(os.path.join(HERE, "orient6.jpg"), quality=90, exif=exif.tobytes())

def scan(path):  # the bytes from the first DQT on: the same when only APP segments differ
    b = open(path, "rb").read()
    return b[b.index(b"\xff\xdb"):]
assert scan(os.path.join(HERE, "orient1.jpg")) == scan(os.path.join(HERE, "orient6.jpg"))

rgba = np.concatenate([rgb[:16, :24], (xx[:16, :24] * 9 % 256)[..., None].astype(np.uint8)], -1)
Image.fromarray(rgba, "RGBA").save(os.path.join(HERE, "rgba.png"))
grey16 = ((xx[:16, :24] * 2731 + yy[:16, :24] * 97) % 65536).astype(np.uint16)
Image.fromarray(grey16).save(os.path.join(HERE, "grey16.png"))
out["grey16"] = grey16.view(np.uint8).reshape(16, 24, 2)  # little-endian u16, as bytes
out["rgba"] = rgba

header, blobs, at = {}, [], 0
for k in sorted(out):
    a = np.ascontiguousarray(out[k], dtype=np.uint8)
    header[k] = {"dtype": "U8", "shape": list(a.shape), "data_offsets": [at, at + a.nbytes]}
    blobs.append(a.tobytes())
    at += a.nbytes
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
with open(os.path.join(HERE, "pil_refs.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
import PIL; print("pillow", PIL.__version__)
