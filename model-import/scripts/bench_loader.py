#!/usr/bin/env python3
"""The Python side of the loader benchmark (`cargo bench --bench loader`): JPEG file to normalised
CLIP pixels with PIL and transformers' PIL-based CLIP image processor, as LLaVA-JP's dataset does
it (`Image.open(...).convert("RGB")`, then the processor at `size = crop_size = S`), on one core.

    python3 bench_loader.py [--size 336] [--seconds 5] IMAGE...

Prints one JSON line: {"images_per_s": ..., "ms_per_image": ..., "processor": ...}.
"""
import argparse
import json
import time

import numpy as np
from PIL import Image

try:  # transformers 5: the PIL path has its own class
    from transformers import CLIPImageProcessorPil as Processor
except ImportError:
    from transformers import CLIPImageProcessor as Processor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("images", nargs="+")
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    s = args.size
    proc = Processor(size={"height": s, "width": s}, crop_size={"height": s, "width": s}, resample=3,
                     image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])

    def one(path):
        img = Image.open(path).convert("RGB")
        pixels = proc(img, return_tensors="np")["pixel_values"][0]
        assert pixels.shape == (3, s, s) and pixels.dtype == np.float32
        return pixels

    for p in args.images:  # warm-up
        one(p)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for p in args.images:
            one(p)
            done += 1
    elapsed = time.perf_counter() - start
    print(json.dumps({"images_per_s": done / elapsed, "ms_per_image": 1000 * elapsed / done,
                      "images": done, "processor": Processor.__name__}))


if __name__ == "__main__":
    main()
