#!/usr/bin/env python3
"""The flash kernels' tile map (src/flash_attention.cu: `flash_attention_tile_map` writing it,
`tile_map_of`, `stage_map_line` and `map_sees` reading it) emulated with numpy, its index expressions copied as
written, against each tile classified straight from the mask, as `stage_mask` does without a
map. Masks: GPT-2's causal-with-padding (one per batch, broadcast over heads), random per-head
masks, fewer queries than keys, lengths that are not multiples of the tile. A deliberate
mistake (the map's rows taken as long as its columns) must fail.
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


def read_map(map_, b, h, heads, queries, keys, mask_head_stride, q_first, k_first, along_keys, map_line, swapped=False):
    """`tile_map_of`, `stage_map_line` (the block's row of the map when `along_keys`, else its
    column; the first `map_line` bytes staged) and `map_sees`."""
    map_heads = 1 if mask_head_stride == 0 else heads
    query_tiles, key_tiles = (queries + TILE - 1) // TILE, (keys + TILE - 1) // TILE
    map_bh = (b * map_heads + (0 if map_heads == 1 else h)) * query_tiles * key_tiles
    cols = key_tiles
    fixed = (q_first if along_keys else k_first) // TILE
    if swapped:
        cols = query_tiles
    start = map_bh + fixed * cols if along_keys else map_bh + fixed
    step = 1 if along_keys else cols
    n = key_tiles if along_keys else query_tiles
    # A read past the map (only a mistaken index makes one) answers 255, which no tile is.
    at = lambda j: map_[j] if j < len(map_) else 255
    staged = [at(start + i * step) for i in range(min(n, map_line))]
    i = (k_first if along_keys else q_first) // TILE
    return staged[i] if i < map_line else at(start + i * step)


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


def check(mask, heads, map_line=256, swapped=False):
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
                    for along_keys in (True, False):
                        got = read_map(map_, b, h, heads, queries, keys, stride, q_first, k_first, along_keys, map_line, swapped)
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
    # MAP_LINE as the kernels stage it, and 3 so that lines past it read the map in global memory.
    for map_line in (256, 3):
        for name, mask, heads in cases:
            bad = check(mask, heads, map_line)
            print(f"{'ok  ' if bad == 0 else 'FAIL'} {name}, {map_line} staged: {bad} tiles differ")
            assert bad == 0, name
    seen = {int(v) for name, mask, heads in cases for v in build_map(mask, *mask.shape[:1], heads, *mask.shape[2:], 0 if mask.shape[1] == 1 else 1)}
    assert seen == {NONE, SOME, ALL}, f"the cases reach every answer: {seen}"
    bad = check(gpt2_mask(2, 300, 608, [608, 400]), 2, swapped=True)
    print(f"{'ok  ' if bad else 'FAIL'} the map's rows taken as query tiles long is caught: {bad} tiles differ")
    assert bad > 0


if __name__ == "__main__":
    main()
