#!/usr/bin/env python3
"""Full-size training-step benchmark, PyTorch side and data for ours (run by bench_train.sh).

    python3 bench_train.py data OUT --tokenizer TOKENIZER_JSON   # images, JSONL, our run configs
    python3 bench_train.py torch --stage 2 --batch 8 --seq 1024 --steps 8 [--profile TABLE.txt]

`torch` is the reference's step at LLaVA-JP v1.0's sizes (CLIP ViT-L/14-336 tower, mlp2x_gelu,
llm-jp-1.3b's GPT-2) with random weights: bf16 autocast over f32 weights, SDPA attention, fused
AdamW, stage 1 training the projector only, stage 2 projector + LLM; each sample is one image's
576 features spliced into text so that it is exactly `seq` tokens long. Prints one JSON line.
`--profile` also times two more steps under torch.profiler and writes the CUDA kernels' totals
per step to TABLE.txt, to set beside cubecl's per-kernel profile of ours.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../configs/llava-jp-1.3b-v1.0.json")


def data(args):
    from PIL import Image
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for i in range(8):
        Image.new("RGB", (400, 300), (30 * i, 200 - 20 * i, 90)).save(os.path.join(out, "images", f"{i}.png"))
    long_text = "これは長い説明の文章です。" * 200  # cut to the maximum length (truncate_long)
    with open(os.path.join(out, "stage1.jsonl"), "w") as f:
        for i in range(256):
            f.write(json.dumps({"id": f"c{i}", "image": f"{i % 8}.png", "conversations": [
                {"from": "ユーザー", "value": "<image>\n説明して。"}, {"from": "システム", "value": long_text}]}, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "stage2.jsonl"), "w") as f:
        for i in range(256):
            f.write(json.dumps({"id": f"q{i}", "image": f"{i % 8}.png", "conversations": [
                {"from": "ユーザー", "value": "<image>\n詳しく説明して。"}, {"from": "システム", "value": long_text}]}, ensure_ascii=False) + "\n")
    config = json.load(open(CONFIG))
    for stage, seq, batch, lr, template in [(1, 608, 32, 1e-3, "plain"), (2, 1024, 8, 2e-5, "v1")]:
        c = dict(config, tokenizer_model_max_length=seq)
        json.dump(c, open(os.path.join(out, f"model-stage{stage}.json"), "w"), indent=1)
        with open(os.path.join(out, f"stage{stage}.toml"), "w") as f:
            f.write(f'''model_config = "{out}/model-stage{stage}.json"
stage = {stage}
data = ["{out}/stage{stage}.jsonl"]
image_folder = "{out}/images"
tokenizer = "{os.path.abspath(args.tokenizer)}"
template = "{template}"
truncate_long = true
output_dir = "{out}/run-stage{stage}"
per_device_train_batch_size = {batch}
gradient_accumulation_steps = 1
learning_rate = {lr}
max_steps = {args.steps}
warmup_ratio = 0.03
precision = "bf16"
dropout = false
save_steps = 100000
dataloader_num_workers = 8
''')


def full_size_model(max_length):
    """LLaVA-JP v1.0's architecture (configs/llava-jp-1.3b-v1.0.json) with random weights, SDPA
    attention and no dropout: (model, vision, projector, lm), on the CPU in f32."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel
    from make_fixtures import Llava
    config = json.load(open(CONFIG))
    vc = {k: v for k, v in config["vision_config"].items()}
    text = GPT2Config(**{k: v for k, v in config.items() if k in GPT2Config().to_dict() and k != "model_type"},
                      attn_implementation="sdpa")
    text.resid_pdrop = text.embd_pdrop = text.attn_pdrop = 0.0
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**vc, attn_implementation="sdpa"))
    d_v, d_t = vc["hidden_size"], text.n_embd
    projector = torch.nn.Sequential(torch.nn.Linear(d_v, d_t), torch.nn.GELU(), torch.nn.Linear(d_t, d_t))
    lm = GPT2LMHeadModel(text)
    return Llava(vision, projector, lm, -2, False, max_length), vision, projector, lm


def bench(args):
    import torch
    dev = "cuda"
    model, vision, projector, lm = full_size_model(args.seq)
    model = model.to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = list(projector.parameters()) + (list(lm.parameters()) if args.stage == 2 else [])
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    if args.gradient_checkpointing:
        # transformers' per-block recomputation, as the reference's `--gradient_checkpointing`.
        lm.config.use_cache = False
        lm.gradient_checkpointing_enable()
    text_len = args.seq - 576 + 1
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(8, 50000, (text_len,), generator=gen).tolist() for _ in range(args.batch)]
    for s in samples:
        s[1] = -200
    labels = [[-100 if t == -200 or i < 2 else t for i, t in enumerate(s)] for s in samples]
    pixels = torch.randn(args.batch, 3, 336, 336, device=dev)
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss, _ = model(samples, labels, pixels, "right")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        profiled = 2
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(profiled):
                step()
            torch.cuda.synchronize()
        # Device time per kernel name, per step, the largest first.
        device_us = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        rows = sorted(((e.key, device_us(e) / profiled, e.count // profiled) for e in prof.key_averages()
                       if device_us(e) > 0), key=lambda r: -r[1])
        total = sum(r[1] for r in rows)
        with open(args.profile, "w") as f:
            f.write(f"# PyTorch stage {args.stage}, batch {args.batch} x {args.seq}: CUDA time per step {total / 1e3:.1f} ms\n")
            for name, us, count in rows:
                f.write(f"{us / 1e3:9.3f} ms {count:6d}x  {name[:160]}\n")
    steady = times[2:] if len(times) > 3 else times
    step_s = sum(steady) / len(steady)
    llm_params = sum(p.numel() for p in lm.parameters())
    tokens = args.batch * args.seq
    print(json.dumps(dict(side="pytorch", stage=args.stage, batch=args.batch, seq=args.seq, step_s=step_s,
                          tokens_per_s=tokens / step_s, samples_per_s=args.batch / step_s,
                          mfu=6 * llm_params * tokens / step_s / 989e12,
                          peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                          peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                          gradient_checkpointing=args.gradient_checkpointing, first_step_s=times[0])))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out")
    d.add_argument("--tokenizer", required=True)
    d.add_argument("--steps", type=int, default=6)
    b = sub.add_parser("torch")
    b.add_argument("--stage", type=int, default=2)
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--seq", type=int, default=1024)
    b.add_argument("--steps", type=int, default=8)
    b.add_argument("--gradient-checkpointing", action="store_true")
    b.add_argument("--profile", help="write torch.profiler's per-kernel CUDA time of two more steps here")
    args = ap.parse_args()
    data(args) if args.cmd == "data" else bench(args)


if __name__ == "__main__":
    main()
