#!/usr/bin/env python3
"""Generation speed of the reference: transformers' `generate` on LLaVA-JP v1.0's architecture
(random weights) in bf16 on CUDA, with the prompts `benches/generate.rs` builds (one image each,
text of varying length, left padding), greedy, no early stop. Prints one JSON line per batch size.

    python3 bench_generate.py --batches 1,8 --text-tokens 48 --new-tokens 128 --runs 3
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--text-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    import torch
    from bench_train import full_size_model
    torch.set_grad_enabled(False)
    model, _, _, lm = full_size_model(1024)
    model = model.to("cuda", torch.bfloat16).eval()
    vocab = lm.config.vocab_size

    def prompt(i):
        n = args.text_tokens + (i * 3) % (args.text_tokens // 2 + 1)
        ids = [8 + (k * 7919 + i * 104729) % (vocab - 8) for k in range(n)]
        ids.insert(min(1, n), -200)
        return ids

    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [prompt(i) for i in range(batch)]
        labels = [[-100] * len(p) for p in prompts]
        pixels = torch.randn(batch, 3, 336, 336, device="cuda", dtype=torch.bfloat16)

        def run(new_tokens):
            torch.cuda.synchronize()
            t = time.perf_counter()
            embeds, _, mask, _ = model.prepare(prompts, labels, model.encode_images(pixels), "left")
            out = lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            assert out.shape[1] == new_tokens, out.shape
            return time.perf_counter() - t, int(mask.sum(1).max())

        run(4)  # warm-up
        ttft, decode = [], []
        for _ in range(args.runs):
            first, prompt_tokens = run(1)
            total, _ = run(args.new_tokens)
            ttft.append(first * 1e3)
            decode.append(batch * (args.new_tokens - 1) / max(total - first, 1e-9))
        print(json.dumps(dict(side="pytorch", backend="cuda", dtype="bf16", batch=batch, prompt_tokens=prompt_tokens,
                              new_tokens=args.new_tokens, ttft_ms=statistics.median(ttft),
                              decode_tokens_per_s=statistics.median(decode), runs=args.runs)), flush=True)


if __name__ == "__main__":
    main()
