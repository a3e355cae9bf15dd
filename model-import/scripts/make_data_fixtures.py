#!/usr/bin/env python3
"""Reference fixtures for the data pipeline: token ids and labels as LLaVA-JP's training code
makes them, with HF tokenizers and the real llm-jp v2.1 tokenizer.

    python3 make_data_fixtures.py TOKENIZER_DIR OUT.json

The reference functions below are LLaVA-JP's `tokenizer_image_token`, `preprocess_multimodal`,
`preprocess_plain` and `preprocess_v1` (llava/train/dataset.py) and its demos' prompt building,
written out again against a `PreTrainedTokenizerFast`; no torch is needed.
"""
import json
import sys

from transformers import AutoTokenizer

IMAGE = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
SYSTEM = "これは好奇心旺盛なユーザーと人工知能システムのチャットです。システムはユーザーの質問に親切、詳細、丁寧に答える。"
TEMPLATES = {
    "v1": dict(system=SYSTEM, roles=("ユーザー", "システム"), sep=" ", sep2="<EOD|LLM-jp>"),
    "vicuna_v1": dict(system="A chat between a curious user and an artificial intelligence assistant. "
                             "The assistant gives helpful, detailed, and polite answers to the user's questions.",
                      roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>"),
}
ROLE = {"ユーザー": 0, "human": 0, "システム": 1, "gpt": 1}


def tokenizer_image_token(prompt, tok):
    chunks = [tok(c).input_ids for c in prompt.split(IMAGE)]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    seps = [[IMAGE_TOKEN_INDEX] * (offset + 1)] * len(chunks)
    for x in [e for pair in zip(chunks, seps) for e in pair][:-1]:
        ids.extend(x[offset:])
    return ids


def get_prompt(t, messages):
    seps = [t["sep"], t["sep2"]]
    ret = t["system"] + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += t["roles"][role] + ": " + (message + seps[i % 2] if message else "")
    return ret


def preprocess_multimodal(turns):
    out = []
    for s in turns:
        v = s["value"]
        if IMAGE in v:
            v = (IMAGE + "\n" + v.replace(IMAGE, "").strip()).strip()
        out.append(dict(s, value=v))
    return out


def preprocess_plain(turns, tok):
    text = IMAGE + turns[1]["value"] + "\n"
    ids = tokenizer_image_token(text, tok)
    labels = list(ids)
    n = len(tokenizer_image_token(IMAGE, tok))
    labels[:n] = [IGNORE_INDEX] * min(n, len(labels))
    return ids, labels


def preprocess_v1(turns, tok, template, has_image, max_length):
    t = TEMPLATES[template]
    if has_image:
        turns = preprocess_multimodal(turns)
    if ROLE[turns[0]["from"]] != 0:
        turns = turns[1:]
    messages = []
    for j, s in enumerate(turns):
        assert ROLE[s["from"]] == j % 2
        messages.append((j % 2, s["value"]))
    conversation = get_prompt(t, messages)
    ids = tokenizer_image_token(conversation, tok) if has_image else tok(conversation).input_ids[:max_length]
    labels = list(ids)
    count = (lambda s: len(tokenizer_image_token(s, tok))) if has_image else (lambda s: len(tok(s).input_ids))
    sep = t["sep"] + t["roles"][1] + ": "
    cur = 0
    for rou in conversation.split(t["sep2"]):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len, instruction_len = count(rou), count(parts[0]) - 2
        for k in range(cur, min(cur + max(instruction_len, 0), len(labels))):
            labels[k] = IGNORE_INDEX
        cur += round_len
    for k in range(cur, len(labels)):
        labels[k] = IGNORE_INDEX
    # Upstream LLaVA's length check (LLaVA-JP dropped it), counting the tokens the tokenizer's
    # post-processor appends after the last round (llm-jp: the final <EOD|LLM-jp>), which the
    # walk never covers; llava-jp reports and skips a sample that fails it.
    trailing = len(tok("").input_ids) - (1 if tok("").input_ids[:1] == [tok.bos_token_id] else 0)
    mismatch = cur < max_length and cur + trailing != len(ids)
    return ids, labels, mismatch


def generation_prompt(tok, history, question, has_image):
    t = TEMPLATES["v1"]
    messages = []
    for q, a in history:
        messages += [(0, q), (1, a)]
    messages.append((0, question))
    if has_image:
        messages[0] = (0, IMAGE + "\n" + messages[0][1])
    messages.append((1, None))
    return tokenizer_image_token(get_prompt(t, messages), tok)[:-1]


def main():
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    U, S = "ユーザー", "システム"
    samples = [
        ("plain caption", "plain", True,
         [{"from": U, "value": "<image>\n画像を簡潔に説明してください。"}, {"from": S, "value": "赤い丸と青い四角が並んでいる。"}]),
        ("plain caption with spaces and a newline", "plain", True,
         [{"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "A cat  sleeps on a laptop.\n二行目　全角スペース"}]),
        ("v1 one turn", "v1", True,
         [{"from": U, "value": "<image>\nこの画像には何が写っていますか？"}, {"from": S, "value": "ノートパソコンの上で猫が寝ています。"}]),
        ("v1 three turns, image moved to the front", "v1", True,
         [{"from": U, "value": "この車は何色ですか？\n<image>"}, {"from": S, "value": "黄色です。"},
          {"from": U, "value": "何人いますか？ Count them, please."}, {"from": S, "value": "1人です。 He is ironing."},
          {"from": U, "value": "絵文字🐈‍⬛とｶﾀｶﾅ、改行\nも"}, {"from": S, "value": "了解🙂です"}]),
        ("v1 leading assistant turn is skipped", "v1", True,
         [{"from": S, "value": "こんにちは"}, {"from": U, "value": "<image>\n何個？"}, {"from": S, "value": "3個"}]),
        ("v1 text only", "v1", False,
         [{"from": U, "value": "日本の首都は？"}, {"from": S, "value": "東京です。"}]),
        ("v1 text only, cut at 24 tokens", "v1", False,
         [{"from": U, "value": "長い質問です。" * 3}, {"from": S, "value": "長い答えです。" * 3}]),
        ("v1 literal end-of-text in an answer", "v1", True,
         [{"from": U, "value": "<image>\n記号は？"}, {"from": S, "value": "<EOD|LLM-jp>です"}]),
    ]
    cases = []
    for name, template, has_image, turns in samples:
        max_length = 24 if "cut" in name else 1024
        if template == "plain":
            ids, labels = preprocess_plain(preprocess_multimodal(turns), tok)
            mismatch = False
        else:
            ids, labels, mismatch = preprocess_v1(turns, tok, template, has_image, max_length)
        cases.append(dict(name=name, template=template, has_image=has_image, max_length=max_length, turns=turns,
                          input_ids=ids, labels=labels, mismatch=mismatch))
    prompts = []
    for history, question, has_image in [
        ([], "この画像について説明してください。", True),
        ([("猫は何匹？", "1匹です。")], "何色ですか？", True),
        ([], "こんにちは", False),
    ]:
        prompts.append(dict(history=history, question=question, has_image=has_image,
                            input_ids=generation_prompt(tok, history, question, has_image)))
    texts = ["吾輩は猫である。名前はまだ無い。", "Hello, world!  Two  spaces.", "改行\nと\tタブ", "絵文字🐈‍⬛😀",
             "ｶﾀｶﾅと全角　スペース", "文中の<EOD|LLM-jp>記号", ""]
    encodings = [dict(text=t, input_ids=tok(t).input_ids) for t in texts]
    decodings = [dict(input_ids=e["input_ids"], text=tok.decode(e["input_ids"], skip_special_tokens=True))
                 for e in encodings]
    out = dict(tokenizer="llm-jp-tokenizer-v2.1", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               cases=cases, prompts=prompts, encodings=encodings, decodings=decodings)
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
