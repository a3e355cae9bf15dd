# The fold's arithmetic on the CPU (numpy), before any GPU run: fold_layernorm's indexing of the
# step kernel's column-block copy gives G = W^T g and B = bias + W^T b, and r (W^T (g h) - mean G)
# + B in f32 is as close to an f64 reference as normalising first in f32, with a residual row that
# has outliers (3000, -800) and a mean offset, as GPT-2-like residual streams do.
#   python3 model-import/results/ln-fold-2026-12-07/fold_check.py
import numpy as np

rng = np.random.default_rng(0)
k, n = 2048, 6144
W = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
g = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
b = (0.1 * rng.standard_normal(k)).astype(np.float32)
bias = (0.1 * rng.standard_normal(n)).astype(np.float32)
h = rng.standard_normal(k).astype(np.float32) * 3
h[5], h[77] = 3000, -800
h += 0.5
# The copy by column blocks of 256 (tile_by_column_blocks), read as fold_layernorm reads it.
tiled = np.concatenate([W[:, c:c + 256].reshape(-1) for c in range(0, n, 256)])
G, B = np.zeros(n, np.float32), np.zeros(n, np.float32)
for c in range(n):
    block = c // 256
    width = min(256, n - block * 256)
    column = tiled[block * 256 * k + (c - block * 256)::width][:k]
    G[c], B[c] = np.dot(column, g), bias[c] + np.dot(column, b)
assert np.allclose(G, W.T @ g, rtol=1e-4, atol=1e-4), "G"
assert np.allclose(B, bias + W.T @ b, rtol=1e-4, atol=1e-4), "B"
mean = h.mean(dtype=np.float64)
rstd = 1 / np.sqrt(((h - mean) ** 2).mean() + 1e-5)
reference = W.astype(np.float64).T @ ((h - mean) * rstd * g + b).astype(np.float64) + bias
first = W.T @ (((h - np.float32(mean)) * np.float32(rstd)) * g + b).astype(np.float32) + bias
folded = np.float32(rstd) * (W.T @ (g * h) - np.float32(mean) * G) + B
e_first, e_folded = np.abs(first - reference).max(), np.abs(folded - reference).max()
print(f"largest |output| {np.abs(reference).max():.3f}; largest error: normalised first {e_first:.2e}, folded {e_folded:.2e}")
assert e_folded < 4 * e_first + 1e-6, "the fold loses precision"
