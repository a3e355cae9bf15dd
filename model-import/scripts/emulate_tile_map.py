#!/usr/bin/env python3
"""The flash kernels' tile map (src/flash_attention.cu: `flash_attention_tile_map` writing it,
`tile_map_of` and `stage_mask` reading it) emulated with numpy, its index expressions copied as
written, against each tile classified straight from the mask, as `stage_mask` does without a
map. Masks: GPT-2's causal-with-padding (one per batch, broadcast over heads), random per-head
masks, fewer queries than keys, lengths that are not multiples of the tile. A deliberate
mistake (the map indexed by key tile first) must fail.
  usage: python3 model-import/scripts/emulate_tile_map.py
"""
import numpy as np

TILE = 64
NONE, SOME, ALL = 0, 1, 2


def classify(hidden, q_first, k_first, queries, keys):
    """`stage_mask`'s answer for one tile: positions past the bounds count as hidden."""
    tile = np.ones((TILE, TILE), bool)
    q_end, k_end = min(q_first + TILE, queries), min(k_first + TILE, keys)
    tile[: q_end - q_first, : k_end - k_first] = hidden[q_first:q_end, k_first:k_end]
    return NONE if tile.all() else SOME if tile.any() else ALL


def build_map(mask, batch, heads, queries, keys, mask_head_stride):
    """`flash_attention_tile_map`: one block per tile, grid y over batch x map_heads."""
    map_heads = 1 if mask_head_stride == 0 else heads
    query_tiles, key_tiles = (queries + TILE - 1) // TILE, (keys + TILE - 1) // TILE
    out = np.full(batch * map_heads * query_tiles * key_tiles, 255, np.uint8)
    for y in range(batch * map_heads):
        b, h = y // map_heads, y % map_heads
        for tile in range(query_tiles * key_tiles):
            q_first, k_first = tile // key_tiles * TILE, tile % key_tiles * TILE
            out[y * query_tiles * key_tiles + tile] = classify(mask[b, h], q_first, k_first, queries, keys)
    return out


def read_map(map_, b, h, heads, queries, keys, mask_head_stride, q_first, k_first, swapped=False):
    """`tile_map_of` then `stage_mask`'s lookup."""
    map_heads = 1 if mask_head_stride == 0 else heads
    query_tiles, key_tiles = (queries + TILE - 1) // TILE, (keys + TILE - 1) // TILE
    base = (b * map_heads + (0 if map_heads == 1 else h)) * query_tiles * key_tiles
    row, col, cols = q_first // TILE, k_first // TILE, (keys + TILE - 1) // TILE
    if swapped:
        return map_[base + col * ((queries + TILE - 1) // TILE) + row]
    return map_[base + row * cols + col]


def gpt2_mask(batch, queries, keys, lengths):
    """`gpt2::attention_mask`: future keys hidden (but a query's own), padded keys hidden."""
    past = keys - queries
    q = np.arange(queries)[:, None]
    k = np.arange(keys)[None, :]
    future = k > q + past
    own = k == q + past
    out = np.zeros((batch, 1, queries, keys), bool)
    for b, n in enumerate(lengths):
        out[b, 0] = (future | (k >= n)) & ~own
    return out


def check(mask, heads, swapped=False):
    batch, mask_heads, queries, keys = mask.shape
    stride = 0 if mask_heads == 1 else 1
    full = np.broadcast_to(mask, (batch, heads, queries, keys))
    map_ = build_map(mask, batch, heads, queries, keys, stride)
    bad = 0
    for b in range(batch):
        for h in range(heads):
            for q_first in range(0, queries, TILE):
                for k_first in range(0, keys, TILE):
                    want = classify(full[b, h], q_first, k_first, queries, keys)
                    got = read_map(map_, b, h, heads, queries, keys, stride, q_first, k_first, swapped)
                    bad += int(want != got)
    return bad


def main():
    rng = np.random.default_rng(7)
    cases = [
        ("gpt2 causal, padded, 608", gpt2_mask(3, 608, 608, [608, 400, 70]), 4),
        ("gpt2 causal, 1024", gpt2_mask(2, 1024, 1024, [1024, 1024]), 2),
        ("gpt2, fewer queries than keys", gpt2_mask(2, 100, 300, [300, 250]), 3),
        ("gpt2, uneven 77", gpt2_mask(2, 77, 77, [77, 30]), 2),
        ("random per head", rng.random((2, 3, 150, 200)) < 0.97, 3),
        ("random per head, mostly seen", rng.random((2, 2, 130, 130)) < 0.02, 2),
    ]
    for name, mask, heads in cases:
        bad = check(mask, heads)
        print(f"{'ok  ' if bad == 0 else 'FAIL'} {name}: {bad} tiles differ")
        assert bad == 0, name
    seen = {int(v) for name, mask, heads in cases for v in build_map(mask, *mask.shape[:1], heads, *mask.shape[2:], 0 if mask.shape[1] == 1 else 1)}
    assert seen == {NONE, SOME, ALL}, f"the cases reach every answer: {seen}"
    bad = check(gpt2_mask(2, 608, 608, [608, 300]), 2, swapped=True)
    print(f"{'ok  ' if bad else 'FAIL'} the map read key tile first is caught: {bad} tiles differ")
    assert bad > 0


if __name__ == "__main__":
    main()
