#!/usr/bin/env python3
"""Reference fixtures for llava-jp, made with Hugging Face transformers.

Each fixture directory holds a checkpoint saved by transformers (random weights, fixed seed)
in both `model.safetensors` and `pytorch_model.bin` form, the inputs (`inputs.safetensors`),
transformers' outputs (`expected.safetensors`) and `fixture.json` naming its kind. The Rust side
(`src/parity.rs`, `llava-jp check`) loads the checkpoint, runs the inputs and compares.

    python3 make_fixtures.py OUT_DIR            # tiny configs (committed under tests/fixtures)
    python3 make_fixtures.py OUT_DIR --full     # CLIP ViT-L/14-336 + llm-jp-1.3b sizes (GPU machine)

The LLaVA reference forward is LLaVA-JP's `prepare_inputs_labels_for_multimodal` (splice the
projected image features where -200 stands, labels -100 there, truncate to
`tokenizer_model_max_length`, pad with zero embeddings, position ids from 0 per sample) followed
by `GPT2LMHeadModel(inputs_embeds=..., labels=...)`, written out here step by step.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def save_both(model, out, full):
    """`model.safetensors` and `config.json` by `save_pretrained`; `pytorch_model.bin` as the
    pickled state dict that older transformers wrote (shared tensors kept shared). Full-size
    fixtures keep only the safetensors, to spare disk and time."""
    model.save_pretrained(out)
    if not full:
        torch.save(model.state_dict(), os.path.join(out, "pytorch_model.bin"))


def ragged(rows, pad=0):
    width = max(len(r) for r in rows)
    t = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        t[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return t, torch.tensor([len(r) for r in rows], dtype=torch.int64)


def clip_vision_config(full):
    if full:  # openai/clip-vit-large-patch14-336
        return dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=28, patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16)


def gpt2_config(full, **over):
    if full:  # llm-jp/llm-jp-1.3b-v1.0
        c = dict(vocab_size=50688, n_positions=2048, n_embd=2048, n_layer=24, n_head=16, n_inner=8192,
                 activation_function="gelu", bos_token_id=7, eos_token_id=7)
    else:
        c = dict(vocab_size=96, n_positions=64, n_embd=32, n_layer=3, n_head=4, n_inner=None,
                 activation_function="gelu", bos_token_id=7, eos_token_id=7)
    c.update(over)
    return GPT2Config(**c)


def make_clip(out, full, dtype):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    vc = clip_vision_config(full)
    tc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
              max_position_embeddings=16, projection_dim=vc["projection_dim"])
    # A whole CLIPModel (text tower included, which the importer must pass over).
    model = CLIPModel(CLIPConfig(text_config=tc, vision_config=vc, projection_dim=vc["projection_dim"])).eval()
    save_both(model, out, full)
    vision = CLIPVisionModel.from_pretrained(out).eval()
    n = 2
    pixels = torch.randn(n, 3, vc["image_size"], vc["image_size"])

    def run(dtype, device):
        result = vision.to(device, dtype)(pixel_values=pixels.to(device, dtype), output_hidden_states=True)
        expected = {f"hidden_states.{i}": h.float().cpu().contiguous() for i, h in enumerate(result.hidden_states)}
        expected["pooler_output"] = result.pooler_output.float().cpu().contiguous()
        return expected

    expected = run(dtype, "cpu")
    save_file({"pixel_values": pixels.contiguous()}, os.path.join(out, "inputs.safetensors"))
    save_file(expected, os.path.join(out, "expected.safetensors"))
    baseline("clip", expected, run)
    write_json(os.path.join(out, "fixture.json"), {"kind": "clip", "reference_dtype": str(dtype)})


def padded_batch(lengths, vocab, side, gen):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    pos = torch.zeros(len(lengths), width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        row = torch.randint(8, vocab, (n,), generator=gen)
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, sl] = row
        mask[i, sl] = 1
        pos[i, sl] = torch.arange(n)
    return ids, mask, pos


def make_gpt2(out, full, dtype, **over):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(1)
    model = GPT2LMHeadModel(gpt2_config(full, **over)).eval()
    save_both(model, out, full)
    gen = torch.Generator().manual_seed(2)
    lengths = [40, 25] if full else [9, 5]
    inputs = {}
    for side in ["right", "left"]:
        g = torch.Generator().manual_seed(3)  # the same tokens on both sides
        ids, mask, pos = padded_batch(lengths, model.config.vocab_size, side, g)
        inputs.update({f"input_ids_{side}": ids, f"attention_mask_{side}": mask, f"position_ids_{side}": pos})

    def run(dtype, device):
        m = model.to(device, dtype)
        expected = {}
        for side in ["right", "left"]:
            args = {k: inputs[f"{k}_{side}"].to(device) for k in ["input_ids", "attention_mask", "position_ids"]}
            logits = m(**args).logits
            # Compare where the reference is meaningful: real tokens only.
            expected[f"logits_{side}"] = (logits.float() * args["attention_mask"][..., None]).cpu().contiguous()
        return expected

    expected = run(dtype, "cpu")
    save_file(inputs, os.path.join(out, "inputs.safetensors"))
    save_file(expected, os.path.join(out, "expected.safetensors"))
    baseline("gpt2", expected, run)
    write_json(os.path.join(out, "fixture.json"), {"kind": "gpt2", "reference_dtype": str(dtype)})


class Llava(torch.nn.Module):
    """The reference LLaVA-JP forward with HF parts."""

    def __init__(self, vision, projector, lm, select_layer, keep_cls, max_length):
        super().__init__()
        self.vision, self.projector, self.lm = vision, projector, lm
        self.select_layer, self.keep_cls, self.max_length = select_layer, keep_cls, max_length

    def encode_images(self, pixels):
        hs = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[self.select_layer]
        return self.projector(hs if self.keep_cls else hs[:, 1:])

    def prepare(self, samples, labels, features, side):
        wte = self.lm.transformer.wte
        dev = wte.weight.device
        embeds, new_labels = [], []
        img = 0
        for ids, lab in zip(samples, labels):
            ids = torch.tensor(ids, device=dev)
            lab = torch.tensor(lab, device=dev)
            cuts = [-1] + torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist() + [len(ids)]
            text = [ids[cuts[i] + 1: cuts[i + 1]] for i in range(len(cuts) - 1)]
            text_lab = [lab[cuts[i] + 1: cuts[i + 1]] for i in range(len(cuts) - 1)]
            text_emb = torch.split(wte(torch.cat(text)), [len(t) for t in text])
            e, l = [], []
            for i in range(len(text)):
                e.append(text_emb[i])
                l.append(text_lab[i])
                if i < len(text) - 1:
                    e.append(features[img])
                    l.append(torch.full((features[img].shape[0],), IGNORE_INDEX, device=dev))
                    img += 1
            embeds.append(torch.cat(e)[: self.max_length])
            new_labels.append(torch.cat(l)[: self.max_length])
        width = max(x.shape[0] for x in embeds)
        b, d = len(embeds), embeds[0].shape[1]
        out = torch.zeros(b, width, d, dtype=embeds[0].dtype, device=dev)
        lab_out = torch.full((b, width), IGNORE_INDEX, dtype=torch.int64, device=dev)
        mask = torch.zeros(b, width, dtype=torch.int64, device=dev)
        pos = torch.zeros(b, width, dtype=torch.int64, device=dev)
        for i, (x, l) in enumerate(zip(embeds, new_labels)):
            n = x.shape[0]
            sl = slice(width - n, width) if side == "left" else slice(0, n)
            out[i, sl], lab_out[i, sl], mask[i, sl], pos[i, sl] = x, l, 1, torch.arange(n, device=dev)
        return out, lab_out, mask, pos

    def forward(self, samples, labels, pixels, side):
        features = self.encode_images(pixels)
        embeds, lab, mask, pos = self.prepare(samples, labels, features, side)
        # A sample's first token is predicted from nothing real; with left padding transformers'
        # shifted loss would predict it from a padding row. Neither LLaVA-JP's right-padded
        # training nor llava-jp trains that target, so it is masked here.
        first = torch.argmax(mask, dim=1)
        lab[torch.arange(lab.shape[0], device=lab.device), first] = IGNORE_INDEX
        result = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, labels=lab)
        return result.logits, result.loss, mask


def llava_jp_state_dict(vision, projector, lm):
    """The whole model under LLaVA-JP's checkpoint names (the tied lm_head left out)."""
    state = {}
    for k, v in vision.state_dict().items():
        # LLaVA-JP's checkpoints (transformers 4.x) keep CLIPVisionModel's `vision_model.` level,
        # which transformers 5 no longer has.
        k = k if k.startswith("vision_model.") else f"vision_model.{k}"
        state[f"model.vision_tower.vision_tower.{k}"] = v
    for k, v in projector.state_dict().items():
        state[f"model.mm_projector.{k}"] = v
    for k, v in lm.state_dict().items():
        if k != "lm_head.weight":  # tied to transformer.wte.weight
            state[k] = v
    return state


def make_llava(out, full, dtype):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(4)
    vc = clip_vision_config(full)
    text = gpt2_config(full)
    vision = CLIPVisionModel(CLIPVisionConfig(**vc)).eval()
    d_v, d_t = vc["hidden_size"], text.n_embd
    projector = torch.nn.Sequential(torch.nn.Linear(d_v, d_t), torch.nn.GELU(), torch.nn.Linear(d_t, d_t))
    lm = GPT2LMHeadModel(text).eval()
    patches = (vc["image_size"] // vc["patch_size"]) ** 2
    max_length = 1024 if full else 40
    config = text.to_dict()
    for k in ["transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"]:
        config.pop(k, None)
    config.update(
        architectures=["LlavaGpt2ForCausalLM"], model_type="llava",
        mm_vision_tower="tiny-clip" if not full else "openai/clip-vit-large-patch14-336",
        mm_hidden_size=d_v, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", image_aspect_ratio="square",
        tokenizer_model_max_length=max_length, tokenizer_padding_side="right",
        vision_config=dict(vc, model_type="clip_vision_model"),
    )
    write_json(os.path.join(out, "config.json"), config)
    state = llava_jp_state_dict(vision, projector, lm)
    state = {k: v.contiguous().clone() for k, v in state.items()}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    if not full:
        full_state = dict(state)
        full_state["lm_head.weight"] = lm.state_dict()["lm_head.weight"]
        torch.save(full_state, os.path.join(out, "pytorch_model.bin"))
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()},
               os.path.join(out, "mm_projector.bin"))
    # The parts a stage-1 run starts from.
    if not full:
        vision.save_pretrained(os.path.join(out, "parts", "clip"))
        llm_dir = os.path.join(out, "parts", "llm")
        lm.config.save_pretrained(llm_dir)
        torch.save(lm.state_dict(), os.path.join(llm_dir, "pytorch_model.bin"))

    model = Llava(vision, projector, lm, -2, False, max_length).eval().to(dtype)
    gen = torch.Generator().manual_seed(5)
    V = text.vocab_size
    rnd = lambda n: torch.randint(8, V, (n,), generator=gen).tolist()
    lens = (30, 40, 20, 12) if full else (5, 6, 2, 3)
    # Batch a: two samples of different lengths, one image each; the answer part is labelled.
    a = [rnd(lens[0]) + [IMAGE_TOKEN_INDEX] + rnd(lens[1]), rnd(lens[2]) + [IMAGE_TOKEN_INDEX] + rnd(lens[3])]
    a_lab = [[IGNORE_INDEX if (t == IMAGE_TOKEN_INDEX or i < lens[0] + 3) else t for i, t in enumerate(s)] for s in a]
    a_lab[1] = [IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else t for t in a[1]]
    # Batch b: one sample with two images, long enough to be cut by max_length.
    nb = (3, 2, max_length) if full else (3, 2, 4)
    b = [rnd(nb[0]) + [IMAGE_TOKEN_INDEX] + rnd(nb[1]) + [IMAGE_TOKEN_INDEX] + rnd(nb[2])]
    b_lab = [[IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else t for t in b[0]]]
    size = vc["image_size"]
    px_a = torch.randn(2, 3, size, size, generator=gen)
    px_b = torch.randn(2, 3, size, size, generator=gen)
    inputs = {}
    batches = [("a", a, a_lab, px_a), ("b", b, b_lab, px_b)]
    for name, samples, labels, px in batches:
        ids_t, ids_len = ragged(samples)
        lab_t, lab_len = ragged(labels, IGNORE_INDEX)
        inputs.update({f"input_ids_{name}": ids_t, f"input_ids_{name}_lengths": ids_len,
                       f"labels_{name}": lab_t, f"labels_{name}_lengths": lab_len, f"pixel_values_{name}": px})

    def run(dtype, device):
        m = model.to(device, dtype)
        expected = {}
        for name, samples, labels, px in batches:
            for side in (["right", "left"] if name == "a" else ["right"]):
                logits, loss, mask = m(samples, labels, px.to(device, dtype), side)
                expected[f"logits_{name}_{side}"] = (logits.float() * mask[..., None].to(device)).cpu().contiguous()
                expected[f"mask_{name}_{side}"] = mask.cpu()
                expected[f"loss_{name}_{side}"] = loss.float().reshape(1).cpu()
        return expected

    expected = run(dtype, "cpu")
    save_file(inputs, os.path.join(out, "inputs.safetensors"))
    save_file(expected, os.path.join(out, "expected.safetensors"))
    baseline("llava", expected, run)
    write_json(os.path.join(out, "fixture.json"), {"kind": "llava", "reference_dtype": str(dtype), "image_tokens": patches})


BASELINE = None  # (dtype, device): also run the reference at this precision and print its error


def baseline(name, expected, run):
    """Prints how far transformers itself lands from the saved f32 reference when it computes in
    another precision, the yardstick for our own bf16 errors."""
    if BASELINE is None:
        return
    dtype, device = BASELINE
    other = run(dtype, device)
    for k, ref in expected.items():
        if k.startswith("mask"):
            continue
        diff = (other[k] - ref).abs().max().item()
        print(f"transformers {name} {k} in {dtype} on {device}: max_abs {diff:.3e}  max_rel {diff / ref.abs().max().item():.3e}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--full", action="store_true", help="full-size architectures (random weights)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--baseline", default=None, choices=["bfloat16", "float16", "float32"],
                   help="also run transformers at this precision (on CUDA when present) and print its error")
    p.add_argument("--only", default=None, choices=["clip", "gpt2", "llava"], help="make one fixture kind")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    global BASELINE
    if args.baseline:
        BASELINE = (getattr(torch, args.baseline), "cuda" if torch.cuda.is_available() else "cpu")
    torch.set_grad_enabled(False)
    want = lambda kind: args.only in (None, kind)
    if want("clip"):
        make_clip(os.path.join(args.out, "clip"), args.full, dtype)
    if want("gpt2"):
        make_gpt2(os.path.join(args.out, "gpt2"), args.full, dtype)
        if not args.full:
            make_gpt2(os.path.join(args.out, "gpt2-untied"), False, dtype, activation_function="gelu_new",
                      tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True)
    if want("llava"):
        make_llava(os.path.join(args.out, "llava"), args.full, dtype)


if __name__ == "__main__":
    main()
