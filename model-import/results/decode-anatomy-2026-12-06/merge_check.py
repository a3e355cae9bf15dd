#!/usr/bin/env python3
"""merge_attention_into (src/graph_decode.cu with rows.patch applied: attn.c_proj's prologue on rows) in numpy, set
against merged_attention (the split-K products' per-output merge) for widths, heads, chunk
counts and block sizes: the per-(head, chunk) weights, the vector path (8 adjacent outputs a
thread, MERGE_CHUNKS chunks at once) and the scalar path give every output, once.
Run: python3 model-import/results/decode-anatomy-2026-12-06/merge_check.py"""
import numpy as np

rng = np.random.default_rng(0)


def merged_attention(acc, ml, k, head_dim, chunks):
    head, d = divmod(k, head_dim)
    m = ml[head, :chunks, 0]
    big = m.max()
    scale = np.exp(m - big)
    return (acc[head, :chunks, d] * scale).sum() / (ml[head, :chunks, 1] * scale).sum()


def merge_into(acc, ml, K, head_dim, chunks, THREADS, MERGE_CHUNKS):
    heads = K // head_dim
    items = heads * chunks
    m = np.array([ml[i // chunks, i % chunks, 0] for i in range(items)])
    l = np.array([ml[i // chunks, i % chunks, 1] for i in range(items)])
    weight = np.zeros(items)
    for i in range(items):
        first = i - i % chunks
        big = m[first:first + chunks].max()
        total = (l[first:first + chunks] * np.exp(m[first:first + chunks] - big)).sum()
        weight[i] = np.exp(m[i] - big) / total
    xs = np.full(K, np.nan)
    writes = np.zeros(K, int)
    flat = acc.reshape(-1)  # [head, max_chunks, head_dim]
    max_chunks = acc.shape[1]
    if K % 8 == 0 and head_dim % 8 == 0:
        for t in range(THREADS):
            for k0 in range(t * 8, K, THREADS * 8):
                head = k0 // head_dim
                base = head * max_chunks * head_dim + k0 % head_dim
                v = np.zeros(8)
                for c0 in range(0, chunks, MERGE_CHUNKS):
                    for u in range(MERGE_CHUNKS):
                        if c0 + u < chunks:
                            at = base + (c0 + u) * head_dim
                            v += flat[at:at + 8] * weight[head * chunks + c0 + u]
                xs[k0:k0 + 8] = v
                writes[k0:k0 + 8] += 1
    else:
        for t in range(THREADS):
            for k in range(t, K, THREADS):
                head = k // head_dim
                base = head * max_chunks * head_dim + k % head_dim
                xs[k] = sum(flat[base + c * head_dim] * weight[head * chunks + c] for c in range(chunks))
                writes[k] += 1
    assert (writes == 1).all(), (K, head_dim, "writes")
    return xs


cases = 0
for K, heads in [(2, 2), (13, 1), (32, 4), (72, 1), (96, 3), (256, 2), (2048, 16)]:
    head_dim = K // heads
    max_chunks = 32
    for chunks in (1, 2, 3, 5, 11, 32):
        acc = rng.standard_normal((heads, max_chunks, head_dim))
        ml = np.stack([rng.standard_normal((heads, max_chunks)) * 3, rng.uniform(0.5, 4, (heads, max_chunks))], -1)
        want = np.array([merged_attention(acc, ml, k, head_dim, chunks) for k in range(K)])
        for THREADS in (256, 1024) if K == 2048 else (256,):
            for mc in (1, 4):
                got = merge_into(acc, ml, K, head_dim, chunks, THREADS, mc)
                assert np.allclose(got, want, rtol=1e-12, atol=1e-12), (K, heads, chunks, THREADS, mc)
                cases += 1
print(f"merge ok ({cases} cases)")
