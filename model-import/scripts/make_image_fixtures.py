#!/usr/bin/env python3
"""Reference pixel tensors for image preprocessing, made with transformers' PIL-based CLIP image
processor as LLaVA-JP calls it (`size={"height": S, "width": S}`, i.e. the `square` mode), and
with LLaVA-JP's `expand2square` before it for the `pad` mode.

    python3 make_image_fixtures.py OUT_DIR IMAGE...

Writes OUT_DIR/pixels.safetensors (`{name}.{mode}`: [3, S, S] float32) and OUT_DIR/images.json.
A synthetic PNG is made too (`synthetic.png`), so that one case has no JPEG decoder in the way.
"""
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw
from safetensors.numpy import save_file

try:  # transformers 5: the PIL path has its own class; the default one resizes through torchvision
    from transformers import CLIPImageProcessorPil as Processor
except ImportError:
    from transformers import CLIPImageProcessor as Processor

SIZE = 64
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def expand2square(img, background):
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def main():
    out, paths = sys.argv[1], sys.argv[2:]
    os.makedirs(out, exist_ok=True)
    synthetic = Image.new("RGB", (150, 90), (250, 250, 250))
    draw = ImageDraw.Draw(synthetic)
    draw.ellipse((10, 10, 70, 70), fill=(220, 30, 30))
    draw.rectangle((85, 20, 140, 80), fill=(30, 60, 200))
    for x in range(0, 150, 3):
        draw.line((x, 85, x, 89), fill=(x, 255 - x, (3 * x) % 256))
    synthetic.save(os.path.join(out, "synthetic.png"))
    paths = [os.path.join(out, "synthetic.png")] + paths
    proc = Processor(size={"height": SIZE, "width": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                     image_mean=MEAN, image_std=STD, resample=3, do_center_crop=True)
    tensors, meta = {}, []
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        img = Image.open(path).convert("RGB")
        for mode in ["square", "pad"]:
            x = expand2square(img, tuple(int(m * 255) for m in MEAN)) if mode == "pad" else img
            pixels = proc(x, return_tensors="np")["pixel_values"][0].astype(np.float32)
            tensors[f"{name}.{mode}"] = np.ascontiguousarray(pixels)
        meta.append(dict(name=name, file=os.path.basename(path), size=list(img.size)))
    save_file(tensors, os.path.join(out, "pixels.safetensors"))
    with open(os.path.join(out, "images.json"), "w") as f:
        json.dump(dict(size=SIZE, mean=MEAN, std=STD, processor=Processor.__name__, images=meta), f, indent=1)


if __name__ == "__main__":
    main()
