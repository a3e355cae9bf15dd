"""Finds a training recipe for the CPU demo fast: the demo's task (synthetic pictures, v1
template, tiny CLIP + projector + tiny GPT-2) rebuilt in PyTorch/transformers and trained under
many settings at once on the GPU machine. What wins is then set in `configs/demo.json`,
`src/demo/` and checked with `llava-jp demo` itself (our trainer is parity-tested against the
same transformers modules, so the recipe carries over).

    python demo_recipe_sweep.py --tokenizer tok.json --out results.jsonl  # runs every variant
"""
import argparse, json, math, multiprocessing as mp, random, sys, time

import numpy as np

COLOURS = [("赤", "赤い", (215, 35, 35)), ("青", "青い", (35, 75, 220)), ("緑", "緑の", (35, 160, 60)),
           ("黄色", "黄色い", (235, 200, 20)), ("紫", "紫の", (135, 50, 175)), ("黒", "黒い", (25, 25, 25))]
SHAPES = ["円", "四角", "三角"]
POSITIONS = ["左上", "上", "右上", "左", "中央", "右", "左下", "下", "右下"]
SIZES = ["小さい", "大きい"]
QUESTIONS = {"colour": "何色ですか？", "shape": "何の形ですか？", "count": "何個ありますか？",
             "position": "どこにありますか？", "size": "大きいですか、小さいですか？"}
SYSTEM = "これは好奇心旺盛なユーザーと人工知能システムのチャットです。システムはユーザーの質問に親切、詳細、丁寧に答える。"
MEAN = np.array([0.48145466, 0.4578275, 0.40821073]); STD = np.array([0.26862954, 0.26130258, 0.27577711])


POSITIONS2 = ["左上", "右上", "左下", "右下"]


def scene(rng, grid=3):
    n = rng.randint(1, 4)
    return dict(colour=rng.randrange(6), shape=rng.randrange(3), large=rng.random() < 0.5, cells=sorted(rng.sample(range(grid * grid), n)), grid=grid)


def answer(s, t):
    return {"colour": COLOURS[s["colour"]][0], "shape": SHAPES[s["shape"]], "count": f"{len(s['cells'])}個",
            "position": (POSITIONS if s["grid"] == 3 else POSITIONS2)[s["cells"][0]], "size": SIZES[int(s["large"])]}[t] + "です。"


def types(s):
    return [t for t in QUESTIONS if t != "position" or len(s["cells"]) == 1]


def draw(s, size, rng, bg, jitter=True, radii=(0.24, 0.42)):
    a = np.full((size, size, 3), 0.0)
    g = bg + rng.integers(0, 16, (size, size))
    a[:] = np.stack([g, g, np.maximum(g - 4, 0)], -1)
    g = s["grid"]; cell = size / g; radius = cell * radii[int(s["large"])]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for c in s["cells"]:
        j = max(cell * 0.5 - radius - 1, 0) if jitter else 0
        cx = (c % g) * cell + cell / 2 + rng.uniform(-j, j); cy = (c // g) * cell + cell / 2 + rng.uniform(-j, j)
        dx, dy = xx - cx, yy - cy
        inside = [dx * dx + dy * dy <= radius * radius, (abs(dx) <= radius * 0.85) & (abs(dy) <= radius * 0.85),
                  (dy >= -radius) & (dy <= radius * 0.8) & (abs(dx) <= (dy + radius) / 1.8 * 0.95)][s["shape"]]
        a[inside] = COLOURS[s["colour"]][2]
    return ((a / 255.0 - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def build(args, v, tok):
    """Training conversations and held-out questions as token ids with labels."""
    rng = random.Random(v.get("seed", 42)); nrng = np.random.default_rng(v.get("seed", 42))
    enc = lambda text: tok.encode(text, add_special_tokens=False).ids
    prefix = enc(SYSTEM + " ユーザー: ")
    def sample(s, qs, with_answers=True):
        ids, labels = [], []
        for k, t in enumerate(qs):
            q = enc(("\n" if k == 0 else "ユーザー: ") + QUESTIONS[t] + " システム: ")
            ids += q; labels += [-100] * len(q)
            if with_answers:
                a = enc(answer(s, t)) + [7]
                ids += a; labels += a
        return ids, labels
    train, held = [], []
    for i in range(v["train_images"] + 150):
        s = scene(rng, v.get("grid", 3)); px = draw(s, v.get("size", 48), nrng, v["bg"], v.get("jitter", True), v.get("radii", (0.24, 0.42)))
        if i < v["train_images"]:
            qs = types(s); rng.shuffle(qs)
            if not v.get("all_q"): qs = qs[: rng.randint(2, len(qs))]
            ids, labels = sample(s, qs)
            train.append((px, ids, labels))
        else:
            for t in types(s):
                ids, _ = sample(s, [t], False)
                held.append((px, ids, enc(answer(s, t)) + [7], t))
    return prefix, train, held


def run(v):
    import torch
    from tokenizers import Tokenizer
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(v.get("seed", 42))
    tok = Tokenizer.from_file(v["tokenizer"])
    prefix, train, held = build(None, v, tok)
    dev = "cuda"
    vt = CLIPVisionModel(CLIPVisionConfig(hidden_size=v["vd"], intermediate_size=2 * v["vd"], num_hidden_layers=v["vl"],
                                          num_attention_heads=2, image_size=v.get("size", 48), patch_size=v["patch"])).to(dev)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=640, n_positions=256, n_embd=v["d"], n_layer=v["layers"], n_head=v["heads"],
                                    resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).to(dev)
    proj = torch.nn.Sequential(torch.nn.Linear(v["vd"], v["d"]), torch.nn.GELU(), torch.nn.Linear(v["d"], v["d"])).to(dev)
    groups = [{"params": list(lm.parameters()), "lr": v["lr"]},
              {"params": list(proj.parameters()), "lr": v["lr"] * v.get("proj_mult", 1)},
              {"params": list(vt.parameters()), "lr": v["lr"] * v.get("tower_mult", 1)}]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    base = [g["lr"] for g in groups]; steps = v["steps"]; warm = math.ceil(0.05 * steps)
    wte = lm.transformer.wte
    pre = torch.tensor(prefix, device=dev)

    def embed(pix, seqs):
        hs = vt(pixel_values=pix, output_hidden_states=True).hidden_states[v["select"]][:, 1:]
        feats = proj(hs); n = feats.shape[1]
        embs = []
        for f, ids in zip(feats, seqs):
            embs.append(torch.cat([wte(pre), f, wte(torch.tensor(ids, device=dev, dtype=torch.long))]))
        return embs, n

    order = []; rng = random.Random(1); t0 = time.time(); losses = []
    for step in range(steps):
        args_bs = v.get("bs", 16)
        if len(order) < args_bs: order += rng.sample(range(len(train)), len(train))
        batch = [train[i] for i in order[:args_bs]]; del order[:args_bs]
        pix = torch.tensor(np.stack([b[0] for b in batch]), device=dev)
        embs, n = embed(pix, [b[1] for b in batch])
        L = max(e.shape[0] for e in embs)
        x = torch.zeros(len(embs), L, v["d"], device=dev); lab = torch.full((len(embs), L), -100, device=dev, dtype=torch.long)
        mask = torch.zeros(len(embs), L, device=dev, dtype=torch.long)
        for i, (e, b) in enumerate(zip(embs, batch)):
            x[i, : e.shape[0]] = e; mask[i, : e.shape[0]] = 1
            lab[i, len(prefix) + n: e.shape[0]] = torch.tensor(b[2], device=dev)
        loss = lm(inputs_embeds=x, attention_mask=mask, labels=lab).loss
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for g, b in zip(opt.param_groups, base): g["lr"] = b * f
        opt.step(); losses.append(loss.item())
        if (step + 1) in v.get("evals", []) or step + 1 == steps:
            acc = evaluate(vt, proj, lm, embed, held, dev, v)
            print(json.dumps({"name": v["name"], "step": step + 1, "loss": float(np.mean(losses[-20:])), "acc": acc,
                              "s": round(time.time() - t0, 1)}, ensure_ascii=False), flush=True)


def evaluate(vt, proj, lm, embed, held, dev, v):
    import torch
    per = {}
    with torch.no_grad():
        for k in range(0, len(held), 64):
            chunk = held[k: k + 64]
            pix = torch.tensor(np.stack([h[0] for h in chunk]), device=dev)
            embs, _ = embed(pix, [h[1] for h in chunk])
            for e, h in zip(embs, chunk):
                x = e[None]; out = []
                for _ in range(len(h[2])):
                    nxt = lm(inputs_embeds=x).logits[0, -1].argmax().item(); out.append(nxt)
                    x = torch.cat([x, lm.transformer.wte(torch.tensor([[nxt]], device=dev))], 1)
                per.setdefault(h[3], []).append(out == h[2])
    return {t: round(float(np.mean(r)), 3) for t, r in per.items()}


args_bs = 16
if __name__ == "__main__":
    p = argparse.ArgumentParser(); p.add_argument("--tokenizer", required=True); p.add_argument("--only", default="")
    a = p.parse_args()
    base = dict(tokenizer=a.tokenizer, train_images=3000, lr=2e-3, steps=1500, d=64, layers=2, heads=2, vd=64, vl=3,
                patch=16, select=-2, evals=[500, 1000], bg=110, all_q=True)
    variants = {
        "g2-32-p8": dict(grid=2, size=32, patch=8, lr=1e-3), "g2-32-p8-d128": dict(grid=2, size=32, patch=8, d=128, heads=4, lr=1e-3),
        "g2-32-p8-d128-lr2e-3": dict(grid=2, size=32, patch=8, d=128, heads=4, lr=2e-3),
        "g3-48-p8-d128-seed7": dict(patch=8, d=128, heads=4, lr=1e-3, seed=7), "g3-48-p8-d64": dict(patch=8, lr=1e-3),
        "g3-48-p8-d128-1000": dict(patch=8, d=128, heads=4, lr=1e-3, steps=1000, evals=[500]),
        "g2-32-p8-d128-1000": dict(grid=2, size=32, patch=8, d=128, heads=4, lr=1e-3, steps=1000, evals=[500]),
        "g2-32-p8-d128-vd32": dict(grid=2, size=32, patch=8, d=128, heads=4, lr=1e-3, vd=32),
        "g2-32-p8-d128-bs32-750": dict(grid=2, size=32, patch=8, d=128, heads=4, lr=1e-3, bs=32, steps=750, evals=[500]),
        "g3-48-p8-d128-vl2": dict(patch=8, d=128, heads=4, lr=1e-3, vl=2, select=-1),
        "g2-32-p8-d128-lr5e-4": dict(grid=2, size=32, patch=8, d=128, heads=4, lr=5e-4),
        "g3-48-p8-d128-nojit": dict(patch=8, d=128, heads=4, lr=1e-3, jitter=False),
        "g2-32-p8-d128-nojit": dict(grid=2, size=32, patch=8, d=128, heads=4, lr=1e-3, jitter=False),
        "g3-48-p8-d128-bs32-750": dict(patch=8, d=128, heads=4, lr=1e-3, bs=32, steps=750, evals=[500]),
    }
    jobs = [dict(base, name=k, **v) for k, v in variants.items() if not a.only or k in a.only.split(",")]
    ctx = mp.get_context("spawn")
    with ctx.Pool(len(jobs)) as pool:
        pool.map(run, jobs)
