#!/usr/bin/env python3
"""transformers' `generate` on the committed tiny LLaVA-JP fixture, for llava-jp's generation tests.

Loads the tiny model from its parts (`parts/clip`, `parts/llm`, `mm_projector.bin` of
tests/fixtures/llava), builds the prompts' embeddings as LLaVA-JP does (image features spliced
where -200 stands, left padding, position ids from the attention mask) and runs
`GPT2LMHeadModel.generate` greedily. Writes beside the fixture:

- `generation.json`: the cases (prompt ids with -200, which image each prompt has, options) and
  the tokens transformers generated for each prompt;
- `generation.safetensors`: the pixel values and, per case and prompt, the logits of every
  generated step (`[steps, vocab]`, before any logits processor).

    python3 make_generation_fixture.py tests/fixtures/llava
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionModel, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import IMAGE_TOKEN_INDEX, Llava  # noqa: E402


def load(dir):
    config = json.load(open(os.path.join(dir, "config.json")))
    vision = CLIPVisionModel.from_pretrained(os.path.join(dir, "parts", "clip")).eval()
    llm_dir = os.path.join(dir, "parts", "llm")
    lm = GPT2LMHeadModel(GPT2Config.from_pretrained(llm_dir)).eval()
    lm.load_state_dict(torch.load(os.path.join(llm_dir, "pytorch_model.bin")))
    d_v, d_t = config["mm_hidden_size"], config["n_embd"]
    projector = torch.nn.Sequential(torch.nn.Linear(d_v, d_t), torch.nn.GELU(), torch.nn.Linear(d_t, d_t))
    state = torch.load(os.path.join(dir, "mm_projector.bin"))
    projector.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in state.items()})
    return Llava(vision, projector, lm, config["mm_vision_select_layer"], False,
                 config["tokenizer_model_max_length"]).eval(), config


def embeds_left_padded(model, prompts, images, pixels):
    """Spliced, left-padded prompt embeddings and their attention mask (LLaVA-JP's generation)."""
    chosen = [i for i in images if i is not None]
    features = model.encode_images(pixels[chosen]) if chosen else None
    embeds, _, mask, _ = model.prepare(prompts, [[-100] * len(p) for p in prompts], features, "left")
    return embeds, mask


def run_case(model, case, pixels):
    """transformers' greedy tokens and per-step logits for each prompt of `case`, generated as one
    batch (embeddings: left padding) or one prompt at a time (text-only with a repetition penalty:
    transformers would penalise the pad id of a left-padded row)."""
    lm = model.lm
    opts = dict(max_new_tokens=case["max_new_tokens"], do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0, eos_token_id=7,
                repetition_penalty=case.get("repetition_penalty", 1.0))
    tokens, logits = [], []
    if case["batched"]:
        embeds, mask = embeds_left_padded(model, case["prompts"], case["images"], pixels)
        out = lm.generate(inputs_embeds=embeds, attention_mask=mask, **opts)
        rows = [out.sequences[i].tolist() for i in range(len(case["prompts"]))]
        step_logits = [torch.stack([s[i] for s in out.logits]) for i in range(len(case["prompts"]))]
    else:
        rows, step_logits = [], []
        for ids in case["prompts"]:
            assert IMAGE_TOKEN_INDEX not in ids
            out = lm.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **opts)
            rows.append(out.sequences[0, len(ids):].tolist())
            step_logits.append(torch.stack([s[0] for s in out.logits]))
    for row, lg in zip(rows, step_logits):
        # A row that met eos is padded after it: keep up to and including the eos.
        if 7 in row:
            row = row[: row.index(7) + 1]
        tokens.append(row)
        logits.append(lg[: len(row)].float().contiguous())
    return tokens, logits


def main():
    dir = sys.argv[1]
    torch.set_grad_enabled(False)
    model, config = load(dir)
    vocab = config["vocab_size"]
    gen = torch.Generator().manual_seed(11)
    rnd = lambda n: torch.randint(8, vocab, (n,), generator=gen).tolist()
    size = config["vision_config"]["image_size"]
    pixels = torch.randn(3, 3, size, size, generator=gen)
    cases = [
        # Different lengths and images in one left-padded batch; one prompt without an image.
        dict(name="images_batched", batched=True, max_new_tokens=12,
             prompts=[rnd(3) + [IMAGE_TOKEN_INDEX] + rnd(4), rnd(1) + [IMAGE_TOKEN_INDEX] + rnd(1), rnd(6)],
             images=[0, 2, None]),
        # The same prompts one at a time (no padding).
        dict(name="images_single", batched=False, max_new_tokens=12, prompts=None, images=None),
        dict(name="text_penalty", batched=False, max_new_tokens=12, repetition_penalty=1.5,
             prompts=[rnd(5), rnd(9)], images=[None, None]),
    ]
    out_cases, tensors = [], {"pixel_values": pixels.contiguous()}
    for case in cases:
        if case["name"] == "images_single":
            # One prompt at a time through the embeddings path, so each is its own batch of one.
            first = cases[0]
            tokens, logits = [], []
            for p, i in zip(first["prompts"], first["images"]):
                t, l = run_case(model, dict(first, prompts=[p], images=[i], batched=True), pixels)
                tokens += t
                logits += l
            case = dict(case, prompts=first["prompts"], images=first["images"])
            assert tokens == out_cases[0]["tokens"], f"transformers' batched {out_cases[0]['tokens']} and single {tokens} disagree"
        else:
            tokens, logits = run_case(model, case, pixels)
        for j, lg in enumerate(logits):
            tensors[f"logits_{case['name']}_{j}"] = lg
        out_cases.append(dict(case, tokens=tokens))
        print(case["name"], tokens)
    with open(os.path.join(dir, "generation.json"), "w") as f:
        json.dump({"source": "transformers GPT2LMHeadModel.generate, greedy, float32 on CPU",
                   "eos_token_id": 7, "cases": out_cases}, f, indent=1)
    save_file(tensors, os.path.join(dir, "generation.safetensors"))


if __name__ == "__main__":
    main()
