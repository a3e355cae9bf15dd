"""PyTorch's scaled_dot_product_attention at the shapes of `benches/attention.rs`, for the ratio
in one device call (bf16, causal where ours is; a single decode query sees every key): forward,
and forward with backward.

    python3 bench_attention.py [--iters 20] [--dropout 0.1]

`--dropout` is the attention dropout of the forward-with-backward timings (training's).
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = [
    ("llm train 8x1024", 8, 16, 1024, 1024, 128, True),
    ("llm train stage1 32x608", 32, 16, 608, 608, 128, True),
    ("llm prefill 1x600", 1, 16, 600, 600, 128, True),
    ("clip 8 images", 8, 16, 577, 577, 64, False),
    ("llm decode 1 vs 600", 1, 16, 1, 600, 128, False),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    for name, b, h, tq, tk, d, causal in SHAPES:
        q = torch.randn(b, h, tq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, h, tk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, h, tk, d, device="cuda", dtype=torch.bfloat16)
        run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            run()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3 / args.iters
        train_ms = None
        if tq > 1:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            step = lambda: F.scaled_dot_product_attention(*leaves, is_causal=causal, dropout_p=args.dropout).sum().backward()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
            train_ms = (time.perf_counter() - start) * 1e3 / args.iters
        print(json.dumps(dict(side="pytorch sdpa", shape=name, ms=ms, train_ms=train_ms, train_dropout=args.dropout)))


if __name__ == "__main__":
    main()
