#!/usr/bin/env python3
"""The reference side of training parity: LLaVA-JP's recipe in PyTorch + transformers on a tiny
model, replaying the batches of one of our runs step by step.

    # 1. a tiny LLaVA-JP checkpoint (random weights, llm-jp vocabulary) and a coloured-squares dataset
    python3 train_reference.py make OUT_DIR --tokenizer TOKENIZER_JSON
    # 2. our run on it (OUT_DIR/stage2.toml points at both), e.g. llava-jp train --config OUT_DIR/stage2.toml --backend cuda
    # 3. the same steps here, in the precision asked, on our run's batches (its metrics.jsonl)
    python3 train_reference.py replay OUT_DIR --metrics RUN/metrics.jsonl --precision bf16 --out losses.json

What `replay` does is the reference's: samples tokenized and masked by LLaVA-JP's
`preprocess_plain` / `preprocess_v1` (see make_data_fixtures.py), images by the PIL CLIP image
processor, the forward of make_fixtures.py's `Llava`, HF Trainer's optimisation (AdamW with
torch's defaults, `get_cosine_schedule_with_warmup`, loss / accumulation steps per micro-batch,
`clip_grad_norm_`), `torch.autocast(bfloat16)` over f32 weights for bf16. Dropout is off on both
sides so that the comparison is deterministic.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

COLOURS = [("赤", (220, 30, 30)), ("青", (30, 60, 220)), ("緑", (30, 200, 60)), ("黄", (230, 220, 40)),
           ("紫", (140, 40, 180)), ("橙", (240, 140, 20)), ("黒", (20, 20, 20)), ("白", (245, 245, 245))]
SHAPES = [("四角", "rectangle"), ("丸", "ellipse")]


def make(args):
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel
    from safetensors.torch import save_file
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    tok = json.load(open(args.tokenizer))
    vocab = len(tok["model"]["vocab"])
    torch.manual_seed(11)
    vc = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=56,
              patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0)
    text = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=64, n_layer=3, n_head=4, activation_function="gelu",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=7, eos_token_id=7,
                      tie_word_embeddings=True)
    vision = CLIPVisionModel(CLIPVisionConfig(**vc))
    projector = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    lm = GPT2LMHeadModel(text)
    config = text.to_dict()
    for k in ["transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"]:
        config.pop(k, None)
    config.update(architectures=["LlavaGpt2ForCausalLM"], model_type="llava", mm_vision_tower="tiny-clip",
                  mm_hidden_size=64, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", image_aspect_ratio="square", tokenizer_model_max_length=128,
                  tokenizer_padding_side="right", vision_config=dict(vc, model_type="clip_vision_model"))
    model_dir = os.path.join(out, "model")
    os.makedirs(model_dir, exist_ok=True)
    json.dump(config, open(os.path.join(model_dir, "config.json"), "w"), indent=1)
    from make_fixtures import llava_jp_state_dict
    state = llava_jp_state_dict(vision, projector, lm)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, os.path.join(model_dir, "model.safetensors"),
              metadata={"format": "pt"})
    # Images: a shape of a colour on white; captions (stage 1) and questions (stage 2).
    captions, qas = [], []
    i = 0
    for cname, rgb in COLOURS:
        for sname, shape in SHAPES:
            img = Image.new("RGB", (64, 48), (250, 250, 250) if cname != "白" else (60, 60, 60))
            d = ImageDraw.Draw(img)
            getattr(d, shape)((14, 8, 50, 40), fill=rgb)
            img.save(os.path.join(out, "images", f"{i}.png"))
            captions.append(dict(id=f"c{i}", image=f"{i}.png", conversations=[
                dict(**{"from": "ユーザー", "value": "<image>\n画像を説明してください。"}),
                dict(**{"from": "システム", "value": f"{cname}い{sname}があります。"})]))
            qas.append(dict(id=f"q{i}", image=f"{i}.png", conversations=[
                dict(**{"from": "ユーザー", "value": "<image>\nこれは何色ですか？"}), dict(**{"from": "システム", "value": f"{cname}です。"}),
                dict(**{"from": "ユーザー", "value": "形は何ですか？"}), dict(**{"from": "システム", "value": f"{sname}です。"})]))
            i += 1
    for name, rows in [("captions.jsonl", captions), ("qa.jsonl", qas)]:
        with open(os.path.join(out, name), "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for stage, data, template, lr in [(1, "captions.jsonl", "plain", 1e-3), (2, "qa.jsonl", "v1", 2e-4)]:
        with open(os.path.join(out, f"stage{stage}.toml"), "w") as f:
            f.write(f'''model_config = "{model_dir}/config.json"
init_from = "{model_dir}"
stage = {stage}
data = ["{out}/{data}"]
image_folder = "{out}/images"
tokenizer = "{os.path.abspath(args.tokenizer)}"
template = "{template}"
output_dir = "{out}/run-stage{stage}"
per_device_train_batch_size = 4
gradient_accumulation_steps = 2
learning_rate = {lr}
max_steps = 20
warmup_ratio = 0.1
max_grad_norm = 1.0
seed = 42
dropout = false
save_steps = 1000
''')
    print(f"wrote {out}: model/, images/, captions.jsonl, qa.jsonl, stage1.toml, stage2.toml")


def replay(args):
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel
    from transformers import get_cosine_schedule_with_warmup
    from safetensors.torch import load_file
    import make_data_fixtures as ref
    from make_fixtures import Llava
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    out = os.path.abspath(args.dir)
    import tomllib
    run = tomllib.load(open(os.path.join(out, f"stage{args.stage}.toml"), "rb"))
    for k, v in (args.set or []):
        run[k] = type(run[k])(v) if k in run else v
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = json.load(open(os.path.join(out, "model", "config.json")))
    vc = config["vision_config"]
    vision = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in vc.items() if k != "model_type"}))
    text = GPT2Config(**{k: v for k, v in config.items() if k in GPT2Config().to_dict() and k != "model_type"})
    lm = GPT2LMHeadModel(text)
    projector = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    state = load_file(os.path.join(out, "model", "model.safetensors"))
    vs = {k.removeprefix("model.vision_tower.vision_tower."): v for k, v in state.items() if k.startswith("model.vision_tower.")}
    missing, unexpected = vision.load_state_dict(vs, strict=False)
    if missing:  # transformers 5 CLIPVisionModel has no `vision_model.` level
        vs = {k.removeprefix("vision_model."): v for k, v in vs.items()}
        vision.load_state_dict(vs, strict=True)
    projector.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in state.items() if k.startswith("model.mm_projector.")})
    lm_state = {k: v for k, v in state.items() if not k.startswith("model.")}
    lm_state["lm_head.weight"] = lm_state["transformer.wte.weight"]
    lm.load_state_dict(lm_state, strict=False)
    lm.tie_weights()
    max_length = config["tokenizer_model_max_length"]
    model = Llava(vision, projector, lm, config["mm_vision_select_layer"], False, max_length).to(dev).float()
    model.train()  # dropout probabilities are 0 in this config

    # What trains, as the stage says.
    for p in model.parameters():
        p.requires_grad_(False)
    trained = list(model.projector.parameters())
    if run["stage"] == 2:
        trained += list(model.lm.parameters())
    for p in trained:
        p.requires_grad_(True)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=run["learning_rate"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)
    steps = [json.loads(l) for l in open(args.metrics) if l.strip()]
    total = run["max_steps"]
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(run["warmup_ratio"] * total), total)

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.dirname(run["tokenizer"]))
    size = vc["image_size"]
    proc = Processor(size={"height": size, "width": size}, crop_size={"height": size, "width": size}, resample=3,
                     image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    records = {}
    for path in run["data"]:
        for line in open(path):
            if line.strip():
                r = json.loads(line)
                records[r["id"]] = r

    def sample(rid):
        r = records[rid]
        if run["template"] == "plain":
            ids, labels = ref.preprocess_plain(ref.preprocess_multimodal(r["conversations"]), tok)
        else:
            ids, labels, mismatch = ref.preprocess_v1(r["conversations"], tok, "v1", True, max_length)
            assert not mismatch, rid
        img = Image.open(os.path.join(run["image_folder"], r["image"])).convert("RGB")
        px = torch.from_numpy(np.asarray(proc(img, return_tensors="np")["pixel_values"][0]))
        return ids, labels, px

    autocast = args.precision == "bf16"
    losses = []
    for s in steps:
        micro = s["batches"]
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for ids_list in micro:
            batch = [sample(i) for i in ids_list]
            px = torch.stack([b[2] for b in batch]).to(dev)
            with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=autocast):
                _, loss, _ = model([b[0] for b in batch], [b[1] for b in batch], px, "right")
            step_loss += loss.item()
            (loss / len(micro)).backward()
        norm = torch.nn.utils.clip_grad_norm_(trained, run.get("max_grad_norm", 1.0))
        opt.step()
        sched.step()
        losses.append(dict(step=s["step"], loss=step_loss / len(micro), grad_norm=float(norm), ours=s["loss"]))
        print(f"step {s['step']:3d}  reference {losses[-1]['loss']:.6f}  ours {s['loss']:.6f}  "
              f"diff {abs(losses[-1]['loss'] - s['loss']):.2e}  |g| ref {float(norm):.4f} ours {s['grad_norm']:.4f}", flush=True)
    json.dump(losses, open(args.out, "w"), indent=1)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    m.add_argument("--tokenizer", required=True)
    r = sub.add_parser("replay")
    r.add_argument("dir")
    r.add_argument("--stage", type=int, default=2)
    r.add_argument("--metrics", required=True)
    r.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    r.add_argument("--out", required=True)
    r.add_argument("--set", nargs=2, action="append")
    args = ap.parse_args()
    make(args) if args.cmd == "make" else replay(args)


if __name__ == "__main__":
    main()
