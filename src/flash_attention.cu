// Flash attention (FlashAttention-2's scheme) for bf16 / f16 on NVIDIA tensor cores
// (mma.sync m16n8k16, sm_80+), compiled at run time by NVRTC through cubecl and launched on
// cubecl's own stream by `src/flash.rs`, which prepends:
//   HEAD_DIM    the head width, a multiple of 16 up to 128
//   IS_BF16     1 for bf16 operands, 0 for f16
//   MASK_BYTES  0 (no mask), 1 (burn's u8 bools) or 4 (u32 bools)
//   DROPOUT     1 to drop probabilities (training's attention dropout), else 0
//   OUT_TOKEN_MAJOR  optional, 1: the forward writes its output as [batch, query, head, D]
//               whatever `out_stride` says (the graph decoders' prefill, which pass no
//               strides); otherwise every kernel writes through `out_stride`
// No CUDA headers: operands are raw 16-bit words, conversions are PTX.
//
// Forward: one block of four warps takes 64 queries of one (batch, head); each warp keeps 16
// query rows in registers and walks the keys 64 at a time through shared memory, keeping a
// running row maximum and sum (online softmax) so the [queries, keys] scores never reach global
// memory; it also writes each row's log-sum-exp for the backward pass. The next tile's keys
// load while this tile's probabilities are formed and multiply its values, and its values
// while its scores are computed (FlashAttention-2's order, one shared buffer each).
// Each (64 queries, 64 keys) tile's mask is staged in shared memory first and classified: a
// tile no query of which sees any key is skipped (its keys and values are not even loaded), so
// a causal mask costs half the work without the kernel being told it is causal; a tile every
// query of which sees every key takes no per-score test. So that the kernels need not stage
// and classify every tile of the mask themselves (a load and two block reductions a tile, in
// the loop's critical path, hidden tiles included), `flash_attention_tile_map` classifies
// every tile once per launch into a byte map (`tile_map` set); the kernels then stage only the
// tiles that see some keys and not others (TILE_MAP=0 turns the map's use off).
// Backward: the scores are recomputed from that log-sum-exp once per block of 64 keys, walking
// the queries, for dK and dV in registers and each tile's dQ share added into an f32
// accumulator by atomics (`flash_attention_backward`, the default). The split pair recomputes
// them twice instead, once per block of keys (dK, dV) and once per block of queries (dQ), so
// that no gradient needs atomics or a zeroed accumulator (`LLAVA_JP_FLASH_BACKWARD=split`).
// Dropout drops a probability after the softmax (its sum and log-sum-exp are the undropped
// ones) and scales the kept ones by 1 / (1 - p); which are dropped is a hash of a seed and the
// score's place, so the backward kernels drop the same ones without a stored mask, and a
// reference written with tensors can too (`SeededDropout` in `src/model/nn.rs` is that hash).
// Scores, sums and gradients accumulate in f32; probabilities and score gradients are rounded
// to the operand type for the products that follow, as PyTorch's flash kernels do.
//
// mma fragments (PTX ISA, m16n8k16 with 16-bit operands), with g = lane / 4, t = lane % 4:
//   A (16x16, row-major): reg 0 (g, 2t..2t+1), 1 (g+8, 2t..), 2 (g, 2t+8..), 3 (g+8, 2t+8..)
//   B (16x8, by column):  reg 0 (k 2t..2t+1, n g), 1 (k 2t+8..2t+9, n g)
//   C (16x8, f32):        0, 1 (g, 2t..2t+1), 2, 3 (g+8, 2t..2t+1)
// so a C fragment pair of two adjacent 8-wide tiles is, packed, the A fragment of 16 columns.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned char u8;
typedef long long i64;

// Kernel parameters, passed by value (cubecl hands its info words to the kernel as one
// grid-constant argument): all 64-bit, in the order `src/flash.rs` writes them.
struct __align__(8) Params {
    i64 batch, heads, queries, keys;
    i64 q_stride[4];     // elements, over [batch, head, position, dim]
    i64 k_stride[4];
    i64 v_stride[4];
    i64 mask_stride[4];  // [batch, head, query, key]; unused without a mask
    i64 do_stride[4];    // the output's gradient (backward only)
    i64 scale_log2e;     // f32 bits: the softmax scale times log2(e), for exp2
    i64 scale;           // f32 bits: the softmax scale
    i64 drop_below;      // dropout: a score whose hash is below this (p * 2^32) is dropped
    i64 keep_scale;      // f32 bits: 1 / (1 - p), the kept scores' factor
    i64 out_stride[3];   // elements, over [batch, head, position] of what the kernel writes
                         // (out; dq; dk and dv; delta's kernel: of the output it reads), its
                         // dimensions contiguous; the token-major forward (OUT_TOKEN_MAJOR)
                         // does not read them
    i64 tile_map;        // 1: `map` holds what each tile of the mask sees (`flash_attention_tile_map`)
};

#define D HEAD_DIM
#define TILE 64
// Shared rows padded by 8 elements so the fragment loads of a warp spread over the banks.
#define ROW (D + 8)
#define NEG_INF (__int_as_float(0xff800000))
// Mask tile rows in bytes: 16 past TILE so vector stores stay aligned and the rows of a warp's
// reads start on different banks.
#define MASK_ROW (TILE + 16)

__device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
#if IS_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ u16 round_one(float x) {
    u16 r;
#if IS_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
#endif
    return r;
}

// c += a · b over a 16x16 (row-major) times 16x8 (by column) tile, f32 accumulators.
__device__ __forceinline__ void mma(float* c, const u32* a, const u32* b) {
#if IS_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#endif
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The shared-space address of a pointer into shared memory, as ldmatrix takes it. The
// compiler's own conversion, not inline PTX: it then knows a tile's base plus a constant is a
// 32-bit sum and folds the constant into the load's immediate offset. Through an opaque
// `cvta.to.shared.u64` it formed a 64-bit address for every load (three instructions and two
// registers each): 22% of the fused backward's loop at D = 128, and its spills.
__device__ __forceinline__ u32 shared_address(const void* at) {
    return (u32)__cvta_generic_to_shared(at);
}

// Four 8x8 matrices of 16-bit words from shared memory, lanes 8m..8m+7 giving the row addresses
// of matrix m; lane (g, t) receives row g, columns 2t..2t+1 of each (transposed: column g, rows
// 2t..2t+1), which is one register of an mma fragment.
__device__ __forceinline__ void ldmatrix_x4(u32* r, const u16* at) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(at)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const u16* at) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(at)));
}

// 2^x by the special-function unit alone (ex2.approx.ftz: ~2 ulp, subnormal results 0).
// exp2f without fast math adds a range test and two multiplies around it for subnormals, which
// a probability that small (below 2^-126) does not need; forward and backward share this one.
__device__ __forceinline__ float exp2_approx(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ u32 pair(u16 lo, u16 hi) {
    return (u32)lo | ((u32)hi << 16);
}

__device__ __forceinline__ float f32_of(i64 bits) {
    return __int_as_float((int)bits);
}

// lowbias32 (Chris Wellons' integer hash): a bijection of 32-bit words whose every output bit
// depends on every input bit.
__device__ __forceinline__ u32 mix32(u32 x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// Dropout's hash, in two steps (`SeededDropout` in `src/model/nn.rs` computes the same): a code
// per query row of (batch, head) `bh` from the seed's two words, then whether the row keeps
// key `key`.
__device__ __forceinline__ u32 dropout_row(const u32* seed, i64 bh, i64 query) {
    return mix32(mix32(seed[0] ^ mix32((u32)bh ^ seed[1])) + (u32)query);
}

__device__ __forceinline__ bool dropout_keeps(u32 row, i64 key, const Params& p) {
    return mix32(row ^ ((u32)key * 0x9e3779b9u)) >= (u32)p.drop_below;
}

// Every kernel runs in blocks of 128 threads (`THREADS` in src/flash.rs).
#define BLOCK_THREADS 128

// Sixteen bytes from global to shared memory without a stop in registers (sm_80+'s cp.async),
// so that a thread has all its copies of a tile in flight at once; `bytes` 0 writes zeros.
// A group of copies completes at `copies_wait`.
__device__ __forceinline__ void copy_async16(void* to, const void* from, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(to)), "l"(from), "r"(bytes) : "memory");
}

__device__ __forceinline__ void copies_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

// Until at most N of this thread's committed groups are pending (then a barrier, for the
// block's copies).
template <int N>
__device__ __forceinline__ void copies_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Rows `first + 0..TILE` (`first` < `count`) of one (batch, head) slice into a padded shared
// tile; rows past `count` are zero (a zero row adds nothing to any product, and a zero V row
// keeps NaN garbage out), then the copies committed as one group. Rows whose dimensions lie
// contiguous and 16-byte aligned move 8 elements per asynchronous copy: the caller waits
// (`copies_wait`) and syncs before reading the tile. Other layouts load synchronously.
__device__ __forceinline__ void load_tile(u16* tile, const u16* base, const i64* stride, i64 first, i64 count) {
    const bool vector = stride[3] == 1 && (stride[2] & 7) == 0 && (((unsigned long long)base) & 15) == 0;
    if (vector && BLOCK_THREADS % (D / 8) == 0) {
        // A thread copies the same 8 columns of every ROWS_PER_PASS-th row, so its addresses
        // step by a constant: a few instructions a copy, where recomputing each from a flat
        // index took ~35. Not unrolled: the copies go out one after another all the same
        // (none waits for the one before), and unrolled addresses cost the kernels registers
        // they spill.
        constexpr int ROWS_PER_PASS = BLOCK_THREADS / (D / 8 > 0 ? D / 8 : 1);
        const int r0 = threadIdx.x / (D / 8), c = (threadIdx.x % (D / 8)) * 8;
        const u16* from = base + (first + r0) * stride[2] + c;
        const i64 from_step = ROWS_PER_PASS * stride[2];
        u16* to = tile + r0 * ROW + c;
        i64 row = first + r0;
#pragma unroll 1
        for (int j = 0; j < TILE / ROWS_PER_PASS; ++j) {
            // A row past the end copies 0 bytes from one inside (the tile's first): zeros.
            const bool inside = row < count;
            copy_async16(to, inside ? from : base + first * stride[2] + c, inside ? 16 : 0);
            from += from_step;
            to += ROWS_PER_PASS * ROW;
            row += ROWS_PER_PASS;
        }
        copies_commit();
        return;
    }
    if (vector) {
        // Head widths whose rows of 8-column copies do not divide the block (48, 80, 96, 112).
#pragma unroll 1
        for (int j = 0; j < TILE * D / 8 / BLOCK_THREADS; ++j) {
            const int i = threadIdx.x + j * BLOCK_THREADS;
            const int r = i / (D / 8), c = (i % (D / 8)) * 8;
            const i64 row = first + r;
            const bool inside = row < count;
            copy_async16(tile + r * ROW + c, base + (inside ? row : first) * stride[2] + c, inside ? 16 : 0);
        }
        copies_commit();
        return;
    }
    for (int i = threadIdx.x; i < TILE * D; i += blockDim.x) {
        const int r = i / D, c = i % D;
        const i64 row = first + r;
        tile[r * ROW + c] = row < count ? base[row * stride[2] + c * stride[3]] : (u16)0;
    }
    copies_commit();  // an empty group, so that every tile counts one in `copies_wait`
}

// Rows `rows[0]`, `rows[1]` (g and g+8 of a warp's 16) of a slice as A fragments, one per 16
// dimensions, straight from global memory; rows past `count` are zero.
__device__ __forceinline__ void load_a(u32 (*frag)[4], const u16* base, const i64* stride, const i64* rows, i64 count) {
    const int t = (threadIdx.x & 31) & 3;
    const bool inside[2] = {rows[0] < count, rows[1] < count};
    // Each register is two neighbouring dimensions: where they lie side by side and 4-byte
    // aligned, one 32-bit load. A row past the end reads the slice's first row (there is one)
    // and is zeroed after, so that no load waits on a branch: per pair behind its own test, the
    // 64 loads of the forward's queries took ~880 instructions at D = 128.
    if (stride[3] == 1 && (stride[2] & 1) == 0 && (((unsigned long long)base) & 3) == 0) {
        const u16* at[2] = {base + (inside[0] ? rows[0] : 0) * stride[2], base + (inside[1] ? rows[1] : 0) * stride[2]};
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const u32 x = *(const u32*)(at[r & 1] + c * 16 + (r >> 1) * 8 + 2 * t);
                frag[c][r] = inside[r & 1] ? x : 0u;
            }
        }
        return;
    }
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const i64 row = rows[r & 1];
            const int col = c * 16 + (r >> 1) * 8 + 2 * t;
            u16 lo = 0, hi = 0;
            if (inside[r & 1]) {
                const u16* at = base + row * stride[2];
                lo = at[col * stride[3]];
                hi = at[(col + 1) * stride[3]];
            }
            frag[c][r] = pair(lo, hi);
        }
    }
}

// Whether query `row` may not see key `key`: past the end, or masked. `mask_bh` is the mask of
// this block's (batch, head) (see `mask_of`).
__device__ __forceinline__ bool hidden(const u8* mask_bh, const Params& p, i64 row, i64 key) {
    if (key >= p.keys || row >= p.queries) return true;
#if MASK_BYTES
    const i64 at = row * p.mask_stride[2] + key * p.mask_stride[3];
#if MASK_BYTES == 1
    return mask_bh[at] != 0;
#else
    return ((const u32*)mask_bh)[at] != 0;
#endif
#else
    return false;
#endif
}

__device__ __forceinline__ const u8* mask_of(const u8* mask, const Params& p, i64 b, i64 h) {
#if MASK_BYTES
    return mask + (b * p.mask_stride[0] + h * p.mask_stride[1]) * MASK_BYTES;
#else
    return mask;
#endif
}

// What a tile of 64 queries x 64 keys sees (`stage_mask`).
#define SEES_NONE 0  // every score hidden: the tile is skipped
#define SEES_SOME 1  // the staged mask tile says which
#define SEES_ALL 2   // no score hidden: no test per score

#ifndef TILE_MAP
#define TILE_MAP 1
#endif

__device__ __forceinline__ i64 query_tiles(const Params& p) { return (p.queries + TILE - 1) / TILE; }
__device__ __forceinline__ i64 key_tiles(const Params& p) { return (p.keys + TILE - 1) / TILE; }

// The tile map's rows are per (batch, head), or per batch where the mask is the same for every
// head (broadcast: head stride 0), `query_tiles` x `key_tiles` bytes each.
__device__ __forceinline__ i64 map_heads(const Params& p) { return p.mask_stride[1] == 0 ? 1 : p.heads; }

// This (batch, head)'s tile map, or null where the launch gave none (or TILE_MAP=0).
__device__ __forceinline__ const u8* tile_map_of(const u8* map, const Params& p, i64 b, i64 h) {
#if MASK_BYTES && TILE_MAP
    if (p.tile_map == 0) return nullptr;
    const i64 heads = map_heads(p);
    return map + (b * heads + (heads == 1 ? 0 : h)) * query_tiles(p) * key_tiles(p);
#else
    return nullptr;
#endif
}

// The map's line a block walks: its row (a block of queries walking the keys) or its column (a
// block of keys walking the queries), the first MAP_LINE bytes staged in shared memory once at
// the block's start. Each tile's lookup then waits on no global load in the loop's critical
// path, and walking the hidden tiles (past a causal mask's diagonal, or before it) costs a
// shared load each; positions past 64 * MAP_LINE read the map in global memory.
#define MAP_LINE 256
struct MapLine {
    const u8* global;  // the line's first byte in the map; null: no map
    const u8* staged;  // its first MAP_LINE bytes, in shared memory
    u32 step;          // bytes between neighbours along the line in the map
    bool along_keys;   // a row of the map, else a column
};

__device__ __forceinline__ MapLine no_map_line() {
    return MapLine{nullptr, nullptr, 0, true};
}

// The line of `map_bh` (null for none) through the tile at `fixed_first` (a query position
// when `along_keys`, else a key position) into `staged`. The whole block calls it: it ends on a
// barrier where there is a map. (Only `global` depends on whether there is one: the other
// fields stay constants the compiler folds, not registers held through the kernels' loops.)
__device__ __forceinline__ MapLine stage_map_line(u8* staged, const u8* map_bh, const Params& p, i64 fixed_first, bool along_keys) {
#if MASK_BYTES && TILE_MAP
    const u32 cols = (u32)key_tiles(p), fixed = (u32)(fixed_first / TILE);
    MapLine line = {nullptr, staged, along_keys ? 1u : cols, along_keys};
    if (map_bh) {
        line.global = along_keys ? map_bh + fixed * cols : map_bh + fixed;
        const u32 n = along_keys ? cols : (u32)query_tiles(p);
        for (u32 i = threadIdx.x; i < n && i < MAP_LINE; i += BLOCK_THREADS) staged[i] = line.global[i * line.step];
        __syncthreads();
    }
    return line;
#else
    return no_map_line();
#endif
}

// What the tile at (`q_first`, `k_first`) on the line sees.
__device__ __forceinline__ int map_sees(const MapLine& line, i64 q_first, i64 k_first) {
    // 32-bit tile indices (positions fit): fewer registers in the kernels' loops.
    const u32 i = (u32)(line.along_keys ? k_first : q_first) / TILE;
    return i < MAP_LINE ? line.staged[i] : line.global[i * line.step];
}

// W bytes (16, 8 or 4) as words, for vector loads and stores of the mask.
template <int W>
struct __align__(W) Words {
    u32 word[W / 4];
};

// The mask rows of a tile inside the bounds, W bytes per load (`first` and the row stride
// multiples of W), each byte made 0 or 1 (any nonzero byte is true); `all` and `any` gather
// whether this thread's bytes were all / any true.
template <int W>
__device__ __forceinline__ void stage_mask_rows(u8* tile, const u8* first, i64 row_stride, int& all, int& any) {
    // Every load first, so that they are in flight together.
    constexpr int PER_THREAD = TILE * TILE / W / BLOCK_THREADS;
    Words<W> loaded[PER_THREAD];
#pragma unroll
    for (int l = 0; l < PER_THREAD; ++l) {
        const int i = threadIdx.x + l * BLOCK_THREADS;
        loaded[l] = *(const Words<W>*)(first + (i / (TILE / W)) * row_stride + (i % (TILE / W)) * W);
    }
#pragma unroll
    for (int l = 0; l < PER_THREAD; ++l) {
        const int i = threadIdx.x + l * BLOCK_THREADS;
        const int r = i / (TILE / W), c = (i % (TILE / W)) * W;
        Words<W> w = loaded[l];
#pragma unroll
        for (int j = 0; j < W / 4; ++j) {
            // The high bit of (byte & 0x7f) + 0x7f, or of the byte itself, is set exactly when
            // the byte is nonzero.
            const u32 x = w.word[j];
            const u32 bits = ((((x & 0x7f7f7f7fu) + 0x7f7f7f7fu) | x) & 0x80808080u) >> 7;
            w.word[j] = bits;
            all &= bits == 0x01010101u;
            any |= bits != 0;
        }
        *(Words<W>*)(tile + r * MASK_ROW + c) = w;
    }
}

// Stages which scores of the tile (queries `q_first + 0..TILE`, keys `k_first + 0..TILE`) are
// hidden into `tile` (one byte each, 1 = hidden, rows of MASK_ROW bytes, by query) and says what
// the tile sees; the whole block calls it and it ends on a barrier, except where it can answer
// from the bounds alone (no mask, tile inside them) or from the tile map (`line`, on which the
// tile lies; its `global` null for none: a tile that sees all or none is not staged), which
// every thread does alike. Callers
// order their own shared memory with barriers of their own: without a mask no barrier is here.
__device__ __forceinline__ int stage_mask(u8* tile, const u8* mask_bh, const MapLine& line, const Params& p, i64 q_first, i64 k_first) {
#if MASK_BYTES && TILE_MAP
    if (line.global) {
        const int sees = map_sees(line, q_first, k_first);
        if (sees != SEES_SOME) return sees;
    }
#endif
    const bool edge = q_first + TILE > p.queries || k_first + TILE > p.keys;
#if !MASK_BYTES
    if (!edge) return SEES_ALL;
#endif
    int all = 1, any = 0;  // of this thread's share: all hidden, any hidden
#if MASK_BYTES == 1
    const u8* first = mask_bh + q_first * p.mask_stride[2] + k_first;
    // The widest loads the row stride and the tile's address allow (GPT-2's mask over 600
    // tokens has rows 8 bytes apart modulo 16).
    const unsigned long long align = (unsigned long long)p.mask_stride[2] | (unsigned long long)first;
    if (!edge && p.mask_stride[3] == 1 && (align & 3) == 0) {
        if ((align & 15) == 0) stage_mask_rows<16>(tile, first, p.mask_stride[2], all, any);
        else if ((align & 7) == 0) stage_mask_rows<8>(tile, first, p.mask_stride[2], all, any);
        else stage_mask_rows<4>(tile, first, p.mask_stride[2], all, any);
    } else
#endif
    {
        for (int i = threadIdx.x; i < TILE * TILE; i += blockDim.x) {
            const int r = i / TILE, c = i % TILE;
            const bool h = hidden(mask_bh, p, q_first + r, k_first + c);
            tile[r * MASK_ROW + c] = h;
            all &= h;
            any |= h;
        }
    }
    all = __syncthreads_and(all);
    any = __syncthreads_or(any);
    return all ? SEES_NONE : any ? SEES_SOME : SEES_ALL;
}

// The first tile of keys from `k_first` on (a multiple of TILE) that some query of the block
// (queries `q_block + 0..TILE`) sees, its mask staged in `tile` and what it sees in `sees`;
// `p.keys` when none is left. The whole block calls it (`stage_mask`'s barriers).
__device__ __forceinline__ i64 next_key_tile(u8* tile, const u8* mask_bh, const MapLine& line, const Params& p, i64 q_block, i64 k_first, int& sees) {
    for (i64 k0 = k_first; k0 < p.keys; k0 += TILE) {
        sees = stage_mask(tile, mask_bh, line, p, q_block, k0);
        if (sees != SEES_NONE) return k0;
    }
    return p.keys;
}

// acc[n] (16 rows x 8 columns each) += a (16 x 16 * CHUNKS) · tile (16 * CHUNKS rows x D of a
// shared tile, read down its rows): the `p v` shape, `a` given as C fragments of 2 * CHUNKS
// 8-wide tiles. The tile's B fragments come transposed by ldmatrix, two 8-wide tiles per load.
template <int CHUNKS>
__device__ __forceinline__ void times_tile_rows(float (*acc)[4], float (*a)[4], const u16* tile) {
    const int lane = threadIdx.x & 31, m = lane >> 3, r = lane & 7;
#pragma unroll
    for (int kk = 0; kk < CHUNKS; ++kk) {
        const u32 af[4] = {pack(a[2 * kk][0], a[2 * kk][1]), pack(a[2 * kk][2], a[2 * kk][3]),
                           pack(a[2 * kk + 1][0], a[2 * kk + 1][1]), pack(a[2 * kk + 1][2], a[2 * kk + 1][3])};
        // Matrices: rows kk*16 + 0..7 and + 8..15, for columns n*8.. then (n+1)*8..
        const u16* at = tile + (kk * 16 + (m & 1) * 8 + r) * ROW + (m >> 1) * 8;
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {
            u32 bf[4];
            ldmatrix_x4_trans(bf, at + n * 8);
            mma(acc[n], af, bf);
            mma(acc[n + 1], af, bf + 2);
        }
    }
}

// s[n] (16 x 8 each, COLS of them, COLS even) = a (16 x D, A fragments) · tileᵀ over the
// tile's first 8 * COLS rows: the `q kᵀ` shape. The tile's B fragments come by ldmatrix, two
// 8-row tiles per load.
template <int COLS>
__device__ __forceinline__ void times_tile_transposed(float (*s)[4], u32 (*a)[4], const u16* tile) {
    const int lane = threadIdx.x & 31, m = lane >> 3, r = lane & 7;
    // Matrices: rows n*8 + 0..7 at columns c*16 + 0..7 and + 8..15, then rows (n+1)*8 + 0..7.
    const u16* at = tile + ((m >> 1) * 8 + r) * ROW + (m & 1) * 8;
#pragma unroll
    for (int n = 0; n < COLS; n += 2) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        s[n + 1][0] = s[n + 1][1] = s[n + 1][2] = s[n + 1][3] = 0.f;
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
            u32 bf[4];
            ldmatrix_x4(bf, at + n * 8 * ROW + c * 16);
            mma(s[n], a[c], bf);
            mma(s[n + 1], a[c], bf + 2);
        }
    }
}

// Writes 16 rows (`rows`, of `count`) x D of f32 C fragments, times `factor`, into the output
// of (batch b, head h) laid out as `p.out_stride` says (its dimensions contiguous). Each lane's
// two neighbouring columns go as one 32-bit word where the rows are 4-byte aligned.
__device__ __forceinline__ void store_rows(u16* out, const Params& p, i64 b, i64 h, i64 count, const i64* rows, float (*acc)[4], float factor) {
    const int t = (threadIdx.x & 31) & 3;
    const bool words = (p.out_stride[2] & 1) == 0 && ((((unsigned long long)out) + 2 * (b * p.out_stride[0] + h * p.out_stride[1])) & 3) == 0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rows[r] >= count) continue;
        u16* at = out + b * p.out_stride[0] + h * p.out_stride[1] + rows[r] * p.out_stride[2];
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const int col = n * 8 + 2 * t;
            const float lo = acc[n][2 * r] * factor, hi = acc[n][2 * r + 1] * factor;
            if (words) {
                *(u32*)(at + col) = pack(lo, hi);
            } else {
                at[col] = round_one(lo);
                at[col + 1] = round_one(hi);
            }
        }
    }
}

#ifndef OUT_TOKEN_MAJOR
#define OUT_TOKEN_MAJOR 0
#endif
// The kernels' register budget (tuning; `LLAVA_JP_FLASH_DEFINES` in src/flash.rs sets these
// for a run): dQ takes its tile's keys DQ_KEYS at a time and dK dV its queries
// DKDV_QUERIES at a time (fewer score fragments live at once), and each asks for at least
// BACKWARD_MIN_BLOCKS blocks per SM (at 128 threads only 3 or more limits the registers).
// Keys 32 and queries 16 at a time took forward + backward at 8 x 16 x 1024 x 128 (causal,
// bf16, H200) from 2.75-2.77 ms (64 and 32) to 2.62-2.63 ms
// (model-import/results/linear-cross-entropy-2026-12-04/, calls 1 and 2).
// The forward asks for FORWARD_MIN_BLOCKS blocks per SM. With its tiles loaded one at a time,
// three (168 registers a thread) beat two (12.5% occupancy, stalled on its global loads: Nsight
// Compute, model-import/results/fused-linear-2026-12-04/). Loading the next tile while this
// one is used needs more registers: at three blocks ptxas spills ~0.8 KB a thread in GPT-2's
// masked case (model-import/scripts/check_kernels.py --ptxas), at two none. Two until timed.
#ifndef FORWARD_MIN_BLOCKS
#define FORWARD_MIN_BLOCKS 2
#endif
#ifndef DQ_KEYS
#define DQ_KEYS 32
#endif
#ifndef DKDV_QUERIES
#define DKDV_QUERIES 16
#endif
#ifndef BACKWARD_MIN_BLOCKS
#define BACKWARD_MIN_BLOCKS 1
#endif
static_assert(DQ_KEYS % 16 == 0 && TILE % DQ_KEYS == 0, "DQ_KEYS: 16, 32 or 64");
static_assert(DKDV_QUERIES % 16 == 0 && TILE % DKDV_QUERIES == 0, "DKDV_QUERIES: 16, 32 or 64");

// The forward's scores (16 x TILE, C fragments) times `scale`, hidden (-inf) where the staged
// mask rows (`mask_rows`: this lane's row g; row g + 8 is 8 rows on) say so when MASKED, and
// each of the lane's two rows' maximum gathered into `tile_max`. A template, so that a tile
// every query of which sees every key takes no per-score test: the test inside the loop
// compiled to a branch per score (BSSY/BSYNC pairs), ~250 instructions a tile in SASS.
template <bool MASKED>
__device__ __forceinline__ void scale_scores(float (*s)[4], const u8* mask_rows, float scale, float* tile_max) {
    const int t = (threadIdx.x & 31) & 3;
#pragma unroll
    for (int n = 0; n < TILE / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float x = MASKED && mask_rows[(e >> 1) * 8 * MASK_ROW + n * 8 + 2 * t + (e & 1)] ? NEG_INF : s[n][e] * scale;
            s[n][e] = x;
            tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
        }
    }
}

extern "C" __global__ void __launch_bounds__(128, FORWARD_MIN_BLOCKS) flash_attention_forward(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u8* __restrict__ mask, const u32* __restrict__ seed, const u8* __restrict__ map, u16* __restrict__ out, float* __restrict__ lse,
    const __grid_constant__ Params p) {
    __shared__ __align__(16) u16 k_tile[TILE * ROW];
    __shared__ __align__(16) u16 v_tile[TILE * ROW];
    __shared__ __align__(16) u8 mask_tile[TILE * MASK_ROW];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const i64 bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const u8* mask_bh = mask_of(mask, p, b, h);
    const i64 q_block = (i64)blockIdx.x * TILE;
    __shared__ u8 map_line[MAP_LINE];
    const MapLine line = stage_map_line(map_line, tile_map_of(map, p, b, h), p, q_block, true);
    const i64 q0 = q_block + warp * 16;  // this warp's first query
    const i64 rows[2] = {q0 + g, q0 + g + 8};
    const u8* mask_rows = mask_tile + (warp * 16 + g) * MASK_ROW;  // row g; row g + 8 is 8 rows on
    const float scale = f32_of(p.scale_log2e);
    const u16* kb = k + b * p.k_stride[0] + h * p.k_stride[1];
    const u16* vb = v + b * p.v_stride[0] + h * p.v_stride[1];

    u32 qa[D / 16][4];
    load_a(qa, q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride, rows, p.queries);

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float row_max[2] = {NEG_INF, NEG_INF};
    float row_sum[2] = {0.f, 0.f};  // this lane's share; the quad's shares are added at the end
    const u32 drop_rows[2] = {DROPOUT ? dropout_row(seed, bh, rows[0]) : 0u, DROPOUT ? dropout_row(seed, bh, rows[1]) : 0u};

    int sees;
    i64 k0 = next_key_tile(mask_tile, mask_bh, line, p, q_block, 0, sees);
    if (k0 < p.keys) {
        load_tile(k_tile, kb, p.k_stride, k0, p.keys);
        load_tile(v_tile, vb, p.v_stride, k0, p.keys);
    }
    while (k0 < p.keys) {
        copies_wait<1>();  // this tile's keys; its values may still be on the way
        __syncthreads();
        float s[TILE / 8][4];
        times_tile_transposed<TILE / 8>(s, qa, k_tile);
        __syncthreads();  // every warp is done with the keys
        // The next tile's keys, before its mask is staged (after the values' product, when the
        // scores' registers are free). With a map, the next tile it does not say is hidden
        // (shared loads, no barrier), so the guess is right and past a causal mask's diagonal
        // nothing is loaded; without one, the tile after this, a guess wrong only past a causal
        // mask's diagonal, and then loaded again below.
        i64 guess = k0 + TILE;
        if (line.global)
            while (guess < p.keys && map_sees(line, q_block, guess) == SEES_NONE) guess += TILE;
        if (guess < p.keys) load_tile(k_tile, kb, p.k_stride, guess, p.keys);
        else copies_commit();  // an empty group, so that the wait below counts alike

        // Scale, mask, and the running maximum of each of this lane's two rows.
        float tile_max[2] = {NEG_INF, NEG_INF};
        if (sees == SEES_SOME) scale_scores<true>(s, mask_rows, scale, tile_max);
        else scale_scores<false>(s, mask_rows, scale, tile_max);
        float alpha[2], shift[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float m = tile_max[r];
            m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
            const float next = fmaxf(row_max[r], m);
            // A row with every key hidden so far has max -inf: shift by 0 so that exp2 gives
            // 0 here, not NaN.
            shift[r] = next == NEG_INF ? 0.f : next;
            alpha[r] = exp2_approx(row_max[r] - shift[r]);
            row_max[r] = next;
            row_sum[r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }
#pragma unroll
        for (int n = 0; n < TILE / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float pe = exp2_approx(s[n][e] - shift[e >> 1]);
                row_sum[e >> 1] += pe;  // the softmax's sum is of every probability, dropped or not
                s[n][e] = (!DROPOUT || dropout_keeps(drop_rows[e >> 1], k0 + n * 8 + 2 * t + (e & 1), p)) ? pe : 0.f;
            }
        }
        copies_wait<1>();  // this tile's values; the next one's keys may still be on the way
        __syncthreads();
        times_tile_rows<TILE / 16>(o, s, v_tile);
        __syncthreads();  // every warp is done with the values and the mask
        const i64 k1 = next_key_tile(mask_tile, mask_bh, line, p, q_block, guess, sees);
        if (k1 < p.keys) {
            if (k1 != guess) {
                copies_wait<0>();  // the guessed keys landed (each thread rewrites only its own)
                load_tile(k_tile, kb, p.k_stride, k1, p.keys);
            }
            load_tile(v_tile, vb, p.v_stride, k1, p.keys);
        }
        k0 = k1;
    }
    copies_wait<0>();  // no copy may land in shared memory after the block has left it

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        // A row that sees no key at all gets 0 (as burn's attention gives), not 0/0; its delta
        // is then 0 and no NaN reaches the backward.
        inv[r] = sum > 0.f ? (DROPOUT ? f32_of(p.keep_scale) : 1.f) / sum : 0.f;
        // The row's log-sum-exp in the scaled base-2 domain, for the backward pass.
        if (rows[r] < p.queries && t == 0) lse[bh * p.queries + rows[r]] = sum > 0.f ? row_max[r] + log2f(sum) : NEG_INF;
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= inv[0];
        o[n][1] *= inv[0];
        o[n][2] *= inv[1];
        o[n][3] *= inv[1];
    }
#if OUT_TOKEN_MAJOR
    // Row q of head h goes to [b, q, h, :]: the heads of a query side by side.
    {
        const int t = (threadIdx.x & 31) & 3;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (rows[r] >= p.queries) continue;
            u16* at = out + ((b * p.queries + rows[r]) * p.heads + h) * D;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) *(u32*)(at + n * 8 + 2 * t) = pack(o[n][2 * r], o[n][2 * r + 1]);  // D even: 4-byte aligned
        }
    }
#else
    store_rows(out, p, b, h, p.queries, rows, o, 1.f);
#endif
}

// The probabilities and score gradients of one 16 x TILE tile, in place: `s` holds scores
// (q kᵀ) and `dp` holds dO vᵀ, both as C fragments; on return `s` holds P and `dp` holds
// dS = P (dP - delta) (before the softmax scale), over COLS 8-wide tiles. QUERY_OF / KEY_OF give
// the query and key of entry e of tile n within the staged mask tile (`sees`, `mask_tile`),
// LSE2_OF and DELTA_OF that query's values, DROP_ROW_OF its dropout code and KEY_AT the key's
// index. With dropout, `s` holds the kept probabilities scaled (Z P, what multiplied V) and
// dP = Z (dO vᵀ). Written twice, with the mask test and without (MASKED a constant in
// PROBABILITIES_AND_GRADIENTS_OF), so that a tile that sees every key takes no per-score branch.
#define PROBABILITIES_AND_GRADIENTS(COLS, QUERY_OF, KEY_OF, LSE2_OF, DELTA_OF, DROP_ROW_OF, KEY_AT)                     \
    if (sees == SEES_SOME) {                                                                                            \
        PROBABILITIES_AND_GRADIENTS_OF(true, COLS, QUERY_OF, KEY_OF, LSE2_OF, DELTA_OF, DROP_ROW_OF, KEY_AT)           \
    } else {                                                                                                            \
        PROBABILITIES_AND_GRADIENTS_OF(false, COLS, QUERY_OF, KEY_OF, LSE2_OF, DELTA_OF, DROP_ROW_OF, KEY_AT)          \
    }
#define PROBABILITIES_AND_GRADIENTS_OF(MASKED, COLS, QUERY_OF, KEY_OF, LSE2_OF, DELTA_OF, DROP_ROW_OF, KEY_AT) \
    _Pragma("unroll") for (int n = 0; n < COLS; ++n) {                                         \
        _Pragma("unroll") for (int e = 0; e < 4; ++e) {                                        \
            const float l2 = LSE2_OF;                                                           \
            const bool masked = MASKED && mask_tile[(QUERY_OF) * MASK_ROW + (KEY_OF)];         \
            const float pe = (masked || l2 == NEG_INF) ? 0.f : exp2_approx(s[n][e] * scale_log2e - l2); \
            const float z = !DROPOUT ? 1.f : dropout_keeps(DROP_ROW_OF, KEY_AT, p) ? keep_scale : 0.f; \
            s[n][e] = pe * z;                                                                   \
            dp[n][e] = pe * (dp[n][e] * z - (DELTA_OF));                                       \
        }                                                                                       \
    }

// dQ: one block per 64 queries, walking the keys. `lse` and `delta` (rowsum(dO * O)) are f32
// [batch * heads, queries]; `dq` is laid out as `p.out_stride` says.
extern "C" __global__ void __launch_bounds__(128, BACKWARD_MIN_BLOCKS) flash_attention_backward_dq(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u8* __restrict__ mask, const u32* __restrict__ seed, const u8* __restrict__ map, const u16* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, u16* __restrict__ dq, const __grid_constant__ Params p) {
    __shared__ __align__(16) u16 k_tile[TILE * ROW];
    __shared__ __align__(16) u16 v_tile[TILE * ROW];
    __shared__ __align__(16) u8 mask_tile[TILE * MASK_ROW];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const i64 bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const u8* mask_bh = mask_of(mask, p, b, h);
    const i64 q_block = (i64)blockIdx.x * TILE;
    __shared__ u8 map_line[MAP_LINE];
    const MapLine line = stage_map_line(map_line, tile_map_of(map, p, b, h), p, q_block, true);
    const i64 q0 = q_block + warp * 16;
    const i64 rows[2] = {q0 + g, q0 + g + 8};
    const float scale_log2e = f32_of(p.scale_log2e), keep_scale = f32_of(p.keep_scale);
    const u32 drop_rows[2] = {DROPOUT ? dropout_row(seed, bh, rows[0]) : 0u, DROPOUT ? dropout_row(seed, bh, rows[1]) : 0u};
    const u16* kb = k + b * p.k_stride[0] + h * p.k_stride[1];
    const u16* vb = v + b * p.v_stride[0] + h * p.v_stride[1];

    u32 qa[D / 16][4], da[D / 16][4];
    load_a(qa, q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride, rows, p.queries);
    load_a(da, dout + b * p.do_stride[0] + h * p.do_stride[1], p.do_stride, rows, p.queries);
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const bool in = rows[r] < p.queries;
        row_lse[r] = in ? lse[bh * p.queries + rows[r]] : NEG_INF;
        row_delta[r] = in ? delta[bh * p.queries + rows[r]] : 0.f;
    }

    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

    for (i64 k0 = 0; k0 < p.keys; k0 += TILE) {
        __syncthreads();
        const int sees = stage_mask(mask_tile, mask_bh, line, p, q_block, k0);
        if (sees == SEES_NONE) continue;
        load_tile(k_tile, kb, p.k_stride, k0, p.keys);
        load_tile(v_tile, vb, p.v_stride, k0, p.keys);
        copies_wait<0>();
        __syncthreads();

#pragma unroll
        for (int c0 = 0; c0 < TILE; c0 += DQ_KEYS) {
            float s[DQ_KEYS / 8][4], dp[DQ_KEYS / 8][4];
            times_tile_transposed<DQ_KEYS / 8>(s, qa, k_tile + c0 * ROW);
            times_tile_transposed<DQ_KEYS / 8>(dp, da, v_tile + c0 * ROW);
            PROBABILITIES_AND_GRADIENTS(DQ_KEYS / 8, warp * 16 + g + (e >> 1) * 8, c0 + n * 8 + 2 * t + (e & 1), row_lse[e >> 1], row_delta[e >> 1],
                                        drop_rows[e >> 1], k0 + c0 + n * 8 + 2 * t + (e & 1))
            times_tile_rows<DQ_KEYS / 16>(acc, dp, k_tile + c0 * ROW);  // dQ += dS k
        }
    }
    store_rows(dq, p, b, h, p.queries, rows, acc, f32_of(p.scale));
}

// dK and dV: one block per 64 keys, walking the queries. Each warp keeps 16 keys (and their
// values) as A fragments and computes the transposed tiles: sᵀ = k qᵀ, dPᵀ = v dOᵀ, then
// dV += Pᵀ dO and dK += dSᵀ q. `dk` and `dv` are laid out as `p.out_stride` says.
extern "C" __global__ void __launch_bounds__(128, BACKWARD_MIN_BLOCKS) flash_attention_backward_dkdv(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u8* __restrict__ mask, const u32* __restrict__ seed, const u8* __restrict__ map, const u16* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, u16* __restrict__ dk, u16* __restrict__ dv,
    const __grid_constant__ Params p) {
    __shared__ __align__(16) u16 q_tile[TILE * ROW];
    __shared__ __align__(16) u16 do_tile[TILE * ROW];
    __shared__ float lse_tile[TILE];
    __shared__ float delta_tile[TILE];
    __shared__ u32 drop_row_tile[TILE];  // the queries' dropout codes
    __shared__ __align__(16) u8 mask_tile[TILE * MASK_ROW];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const i64 bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const u8* mask_bh = mask_of(mask, p, b, h);
    const i64 k_block = (i64)blockIdx.x * TILE;
    __shared__ u8 map_line[MAP_LINE];
    const MapLine line = stage_map_line(map_line, tile_map_of(map, p, b, h), p, k_block, false);
    const i64 k0 = k_block + warp * 16;
    const i64 keys[2] = {k0 + g, k0 + g + 8};
    const float scale_log2e = f32_of(p.scale_log2e), keep_scale = f32_of(p.keep_scale);
    const u16* qb = q + b * p.q_stride[0] + h * p.q_stride[1];
    const u16* db = dout + b * p.do_stride[0] + h * p.do_stride[1];

    u32 ka[D / 16][4], va[D / 16][4];
    load_a(ka, k + b * p.k_stride[0] + h * p.k_stride[1], p.k_stride, keys, p.keys);
    load_a(va, v + b * p.v_stride[0] + h * p.v_stride[1], p.v_stride, keys, p.keys);

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        dk_acc[n][0] = dk_acc[n][1] = dk_acc[n][2] = dk_acc[n][3] = 0.f;
        dv_acc[n][0] = dv_acc[n][1] = dv_acc[n][2] = dv_acc[n][3] = 0.f;
    }

    for (i64 r0 = 0; r0 < p.queries; r0 += TILE) {
        __syncthreads();
        const int sees = stage_mask(mask_tile, mask_bh, line, p, r0, k_block);
        if (sees == SEES_NONE) continue;
        load_tile(q_tile, qb, p.q_stride, r0, p.queries);
        load_tile(do_tile, db, p.do_stride, r0, p.queries);
        for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
            const i64 row = r0 + i;
            lse_tile[i] = row < p.queries ? lse[bh * p.queries + row] : NEG_INF;
            delta_tile[i] = row < p.queries ? delta[bh * p.queries + row] : 0.f;
            if (DROPOUT) drop_row_tile[i] = dropout_row(seed, bh, row);
        }
        copies_wait<0>();
        __syncthreads();

        // Transposed tiles (rows: this warp's keys, columns: queries), DKDV_QUERIES queries at
        // a time so that two such tiles fit in registers beside the four 16 x D operands and sums.
#pragma unroll
        for (int c0 = 0; c0 < TILE; c0 += DKDV_QUERIES) {
            float s[DKDV_QUERIES / 8][4], dp[DKDV_QUERIES / 8][4];
            times_tile_transposed<DKDV_QUERIES / 8>(s, ka, q_tile + c0 * ROW);
            times_tile_transposed<DKDV_QUERIES / 8>(dp, va, do_tile + c0 * ROW);
            PROBABILITIES_AND_GRADIENTS(DKDV_QUERIES / 8, c0 + n * 8 + 2 * t + (e & 1), warp * 16 + g + (e >> 1) * 8, lse_tile[c0 + n * 8 + 2 * t + (e & 1)],
                                        delta_tile[c0 + n * 8 + 2 * t + (e & 1)], drop_row_tile[c0 + n * 8 + 2 * t + (e & 1)], keys[e >> 1])
            times_tile_rows<DKDV_QUERIES / 16>(dv_acc, s, do_tile + c0 * ROW);  // dV += Pᵀ dO
            times_tile_rows<DKDV_QUERIES / 16>(dk_acc, dp, q_tile + c0 * ROW);  // dK += dSᵀ q
        }
    }
    store_rows(dv, p, b, h, p.keys, keys, dv_acc, 1.f);
    store_rows(dk, p, b, h, p.keys, keys, dk_acc, f32_of(p.scale));
}

// The whole backward in one pass (FlashAttention-2's): one block per 64 keys, walking the
// queries, as `flash_attention_backward_dkdv` does, and each tile's dQ share as well, added
// into an f32 accumulator (`dq_acc`, [batch * heads, queries, D], zeroed before) by atomics:
// the scores and their gradients are formed once, not again by a dQ kernel of their own.
// The keys and values stay in shared memory (not registers, which hold dK and dV), beside the
// queries, dO and the tile's score gradients (dSᵀ, [key][query], rounded as the products read
// them): dynamic shared memory, `Kernel::dynamic_shared_bytes` in src/flash.rs.
// The next tile's queries and dO load while this tile's dQ share is formed (they are read
// before it), so the copies overlap the dQ products and atomics.
#define DS_ROW (TILE + 8)
// The dynamic shared memory the fused backward carves up below; src/flash.rs launches it with
// as much (`Kernel::dynamic_shared_bytes`), and model-import/scripts/check_kernels.py reads it
// from this global in the PTX.
#define FUSED_SHARED_BYTES (4 * TILE * ROW * 2 + TILE * DS_ROW * 2 + TILE * MASK_ROW + 3 * TILE * 4)
extern "C" __device__ unsigned int flash_attention_backward_dynamic_shared_bytes = FUSED_SHARED_BYTES;
// dQ's sums are formed DQ_PARTS column ranges at a time (fewer live registers beside dK and
// dV): halves where a half is a whole number of 16-wide fragment pairs.
#define DQ_PARTS ((D / 16) % 2 == 0 ? 2 : 1)

// The first tile of queries from `q_first` on (a multiple of TILE) that sees some key of the
// block (keys `k_block + 0..TILE`), its mask staged in `tile` and what it sees in `sees`;
// `p.queries` when none is left. The whole block calls it (`stage_mask`'s barriers).
__device__ __forceinline__ i64 next_query_tile(u8* tile, const u8* mask_bh, const MapLine& line, const Params& p, i64 k_block, i64 q_first, int& sees) {
    for (i64 r0 = q_first; r0 < p.queries; r0 += TILE) {
        sees = stage_mask(tile, mask_bh, line, p, r0, k_block);
        if (sees != SEES_NONE) return r0;
    }
    return p.queries;
}

// s[n] (16 x 8 each, COLS of them, COLS even) = rows `a_tile + 0..16` (a shared tile, 16 x D,
// read by ldmatrix) · tileᵀ over the tile's first 8 * COLS rows.
template <int COLS>
__device__ __forceinline__ void shared_times_tile_transposed(float (*s)[4], const u16* a_tile, const u16* tile) {
    const int lane = threadIdx.x & 31, m = lane >> 3, r = lane & 7;
    // A matrices: rows 0..7 then 8..15, at columns c*16 + 0..7, then + 8..15.
    const u16* a_at = a_tile + ((m & 1) * 8 + r) * ROW + (m >> 1) * 8;
    const u16* at = tile + ((m >> 1) * 8 + r) * ROW + (m & 1) * 8;
#pragma unroll
    for (int n = 0; n < COLS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
        u32 af[4];
        ldmatrix_x4(af, a_at + c * 16);
#pragma unroll
        for (int n = 0; n < COLS; n += 2) {
            u32 bf[4];
            ldmatrix_x4(bf, at + n * 8 * ROW + c * 16);
            mma(s[n], af, bf);
            mma(s[n + 1], af, bf + 2);
        }
    }
}

// at[0] += a, at[1] += b (`at` 8-byte aligned), atomically: one vector reduction on sm_90.
__device__ __forceinline__ void add_pair(float* at, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(at), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(at, a);
    atomicAdd(at + 1, b);
#endif
}

extern "C" __global__ void __launch_bounds__(128, BACKWARD_MIN_BLOCKS) flash_attention_backward(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u8* __restrict__ mask, const u32* __restrict__ seed, const u8* __restrict__ map, const u16* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, float* __restrict__ dq_acc, u16* __restrict__ dk, u16* __restrict__ dv,
    const __grid_constant__ Params p) {
    extern __shared__ __align__(16) u8 shared[];
    u16* k_tile = (u16*)shared;
    u16* v_tile = k_tile + TILE * ROW;
    u16* q_tile = v_tile + TILE * ROW;
    u16* do_tile = q_tile + TILE * ROW;
    u16* ds_tile = do_tile + TILE * ROW;  // dSᵀ: rows keys, columns queries
    u8* mask_tile = (u8*)(ds_tile + TILE * DS_ROW);
    float* lse_tile = (float*)(mask_tile + TILE * MASK_ROW);
    float* delta_tile = lse_tile + TILE;
    u32* drop_row_tile = (u32*)(delta_tile + TILE);  // the queries' dropout codes

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const i64 bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const u8* mask_bh = mask_of(mask, p, b, h);
    const i64 k_block = (i64)blockIdx.x * TILE;
    __shared__ u8 map_line[MAP_LINE];
    const MapLine line = stage_map_line(map_line, tile_map_of(map, p, b, h), p, k_block, false);
    const i64 k0 = k_block + warp * 16;
    const i64 keys[2] = {k0 + g, k0 + g + 8};
    const float scale_log2e = f32_of(p.scale_log2e), keep_scale = f32_of(p.keep_scale);
    const u16* qb = q + b * p.q_stride[0] + h * p.q_stride[1];
    const u16* db = dout + b * p.do_stride[0] + h * p.do_stride[1];
    const u16* warp_keys = k_tile + warp * 16 * ROW;
    const u16* warp_values = v_tile + warp * 16 * ROW;
    float* dq_bh = dq_acc + bh * p.queries * D;

    load_tile(k_tile, k + b * p.k_stride[0] + h * p.k_stride[1], p.k_stride, k_block, p.keys);
    load_tile(v_tile, v + b * p.v_stride[0] + h * p.v_stride[1], p.v_stride, k_block, p.keys);

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        dk_acc[n][0] = dk_acc[n][1] = dk_acc[n][2] = dk_acc[n][3] = 0.f;
        dv_acc[n][0] = dv_acc[n][1] = dv_acc[n][2] = dv_acc[n][3] = 0.f;
    }

    // A tile's queries, dO and per-query values into shared memory (the first two by
    // asynchronous copies).
    auto load_queries = [&](i64 r0) {
        load_tile(q_tile, qb, p.q_stride, r0, p.queries);
        load_tile(do_tile, db, p.do_stride, r0, p.queries);
        for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
            const i64 row = r0 + i;
            lse_tile[i] = row < p.queries ? lse[bh * p.queries + row] : NEG_INF;
            delta_tile[i] = row < p.queries ? delta[bh * p.queries + row] : 0.f;
            if (DROPOUT) drop_row_tile[i] = dropout_row(seed, bh, row);
        }
    };
    int sees = SEES_NONE;
    i64 r0 = next_query_tile(mask_tile, mask_bh, line, p, k_block, 0, sees);
    if (r0 < p.queries) load_queries(r0);
    while (r0 < p.queries) {
        copies_wait<0>();  // (the keys and values too, on the first tile)
        __syncthreads();

        // Transposed tiles (rows: this warp's keys, columns: queries), DKDV_QUERIES at a time.
#pragma unroll
        for (int c0 = 0; c0 < TILE; c0 += DKDV_QUERIES) {
            float s[DKDV_QUERIES / 8][4], dp[DKDV_QUERIES / 8][4];
            shared_times_tile_transposed<DKDV_QUERIES / 8>(s, warp_keys, q_tile + c0 * ROW);
            shared_times_tile_transposed<DKDV_QUERIES / 8>(dp, warp_values, do_tile + c0 * ROW);
            PROBABILITIES_AND_GRADIENTS(DKDV_QUERIES / 8, c0 + n * 8 + 2 * t + (e & 1), warp * 16 + g + (e >> 1) * 8, lse_tile[c0 + n * 8 + 2 * t + (e & 1)],
                                        delta_tile[c0 + n * 8 + 2 * t + (e & 1)], drop_row_tile[c0 + n * 8 + 2 * t + (e & 1)], keys[e >> 1])
            times_tile_rows<DKDV_QUERIES / 16>(dv_acc, s, do_tile + c0 * ROW);  // dV += Pᵀ dO
            times_tile_rows<DKDV_QUERIES / 16>(dk_acc, dp, q_tile + c0 * ROW);  // dK += dSᵀ q
            // dSᵀ as the products round it, for dQ below.
#pragma unroll
            for (int n = 0; n < DKDV_QUERIES / 8; ++n) {
                u32* row = (u32*)(ds_tile + (warp * 16 + g) * DS_ROW + c0 + n * 8 + 2 * t);
                row[0] = pack(dp[n][0], dp[n][1]);
                row[8 * DS_ROW / 2] = pack(dp[n][2], dp[n][3]);
            }
        }
        __syncthreads();  // dSᵀ whole; this tile's queries, dO, mask and per-query values read

        // The next tile's mask, then its queries and dO on their way during the dQ products.
        const i64 r1 = next_query_tile(mask_tile, mask_bh, line, p, k_block, r0 + TILE, sees);
        if (r1 < p.queries) load_queries(r1);

        // dQ += dS k over this block's keys: each warp 16 queries, DQ_PARTS column ranges at a
        // time, added into dq_acc.
        const i64 query = r0 + warp * 16 + g;
        const int lm = lane >> 3, lr = lane & 7;
        constexpr int COLS = D / DQ_PARTS;
#pragma unroll
        for (int part = 0; part < DQ_PARTS; ++part) {
            float acc[COLS / 8][4];
#pragma unroll
            for (int n = 0; n < COLS / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < TILE / 16; ++kk) {
                // A (16 queries x 16 keys) from dSᵀ transposed: matrix m holds keys
                // kk*16 + (m >> 1)*8 + 0..7 at queries warp*16 + (m & 1)*8 + 0..7.
                u32 af[4];
                ldmatrix_x4_trans(af, ds_tile + (kk * 16 + (lm >> 1) * 8 + lr) * DS_ROW + warp * 16 + (lm & 1) * 8);
                // B (16 keys x 8 dimensions) from the keys' rows, two 8-wide tiles per load.
                const u16* at = k_tile + (kk * 16 + (lm & 1) * 8 + lr) * ROW + part * COLS + (lm >> 1) * 8;
#pragma unroll
                for (int n = 0; n < COLS / 8; n += 2) {
                    u32 bf[4];
                    ldmatrix_x4_trans(bf, at + n * 8);
                    mma(acc[n], af, bf);
                    mma(acc[n + 1], af, bf + 2);
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                if (query + r * 8 >= p.queries) continue;
                float* at = dq_bh + (query + r * 8) * D + part * COLS + 2 * t;
#pragma unroll
                for (int n = 0; n < COLS / 8; ++n) add_pair(at + n * 8, acc[n][2 * r], acc[n][2 * r + 1]);
            }
        }
        r0 = r1;
    }
    copies_wait<0>();  // no copy may land in shared memory after the block has left it (no tile seen)
    store_rows(dv, p, b, h, p.keys, keys, dv_acc, 1.f);
    store_rows(dk, p, b, h, p.keys, keys, dk_acc, f32_of(p.scale));
}

// The fused backward's accumulator kernels take the backward's operands first, as every kernel
// here is launched (src/flash.rs), and read none of them.
#define BACKWARD_OPERANDS const u16* q, const u16* k, const u16* v, const u8* mask, const u32* seed, const u8* map, const u16* dout

// dq_acc (f32 [batch * heads, queries, D]) zeroed, before the backward adds into it: one
// block per 64 queries of one (batch, head).
extern "C" __global__ void __launch_bounds__(128) flash_attention_dq_zero(BACKWARD_OPERANDS, float* __restrict__ dq_acc, const __grid_constant__ Params p) {
    const i64 bh = blockIdx.y, first = (i64)blockIdx.x * TILE;
    const i64 rows = (p.queries - first < TILE ? p.queries - first : TILE);
    float4* at = (float4*)(dq_acc + (bh * p.queries + first) * D);
    for (i64 i = threadIdx.x; i < rows * D / 4; i += BLOCK_THREADS) at[i] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// The value of one 16-bit operand word (bf16 or f16) in f32.
__device__ __forceinline__ float f32_of_word(u16 x) {
#if IS_BF16
    return __int_as_float(((int)x) << 16);
#else
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
    return r;
#endif
}

// delta = rowsum(dO * O) per query row, in f32, which every score gradient of the backward
// subtracts: the output O (`out`) read through `p.out_stride` (over [batch, head, position],
// its dimensions contiguous: the forward's output, perhaps a token-major view), dO through
// `p.do_stride`, delta written as [batch * heads, queries]. One block per 64 queries of one
// (batch, head), each warp a row at a time, its lanes over the row's dimensions.
extern "C" __global__ void __launch_bounds__(128) flash_attention_delta(BACKWARD_OPERANDS, const u16* __restrict__ out, float* __restrict__ delta, const __grid_constant__ Params p) {
    const i64 bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, first = (i64)blockIdx.x * TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u16* ob = out + b * p.out_stride[0] + h * p.out_stride[1];
    const u16* db = dout + b * p.do_stride[0] + h * p.do_stride[1];
    for (int r = warp; r < TILE; r += BLOCK_THREADS / 32) {
        const i64 row = first + r;
        if (row >= p.queries) break;
        float sum = 0.f;
        for (int c = lane; c < D; c += 32) {
            sum += f32_of_word(ob[row * p.out_stride[2] + c]) * f32_of_word(db[row * p.do_stride[2] + c * p.do_stride[3]]);
        }
#pragma unroll
        for (int step = 16; step > 0; step >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, step);
        if (lane == 0) delta[bh * p.queries + row] = sum;
    }
}

// dq (the operand type, laid out as `p.out_stride` says) = dq_acc times the softmax scale.
extern "C" __global__ void __launch_bounds__(128) flash_attention_dq_store(BACKWARD_OPERANDS, const float* __restrict__ dq_acc, u16* __restrict__ dq, const __grid_constant__ Params p) {
    const i64 bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, first = (i64)blockIdx.x * TILE;
    const i64 rows = (p.queries - first < TILE ? p.queries - first : TILE);
    const float scale = f32_of(p.scale);
    const float2* from = (const float2*)(dq_acc + (bh * p.queries + first) * D);
    for (i64 i = threadIdx.x; i < rows * D / 2; i += BLOCK_THREADS) {
        const i64 row = first + i / (D / 2), col = (i % (D / 2)) * 2;
        const float2 x = from[i];
        *(u32*)(dq + b * p.out_stride[0] + h * p.out_stride[1] + row * p.out_stride[2] + col) = pack(x.x * scale, x.y * scale);
    }
}

// The tile map (`Params::tile_map`): what each (64 queries, 64 keys) tile of the mask sees
// (SEES_NONE, SEES_SOME or SEES_ALL, as `stage_mask` classifies it), one block per tile: grid x
// over `query_tiles` x `key_tiles`, grid y over batch x `map_heads`. It takes the forward's
// operands' places, as every kernel here is launched, and reads only the mask of them.
extern "C" __global__ void __launch_bounds__(128) flash_attention_tile_map(const u16* q, const u16* k, const u16* v, const u8* mask, const u32* seed, const u8* map,
                                                                            u8* __restrict__ map_out, const __grid_constant__ Params p) {
    __shared__ __align__(16) u8 mask_tile[TILE * MASK_ROW];
    const i64 heads = map_heads(p), b = blockIdx.y / heads, h = blockIdx.y % heads;
    const i64 tile = blockIdx.x, q_first = tile / key_tiles(p) * TILE, k_first = tile % key_tiles(p) * TILE;
    const int sees = stage_mask(mask_tile, mask_of(mask, p, b, h), no_map_line(), p, q_first, k_first);
    if (threadIdx.x == 0) map_out[blockIdx.y * query_tiles(p) * key_tiles(p) + tile] = (u8)sees;
}
