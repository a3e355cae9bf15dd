import sys
# usage: mkdiag.py out.cu [source.cu, default src/graph_decode.cu]
s=open(sys.argv[2] if len(sys.argv) > 2 else 'src/graph_decode.cu').read()
def rep(old,new,count=1):
    global s
    assert s.count(old)==count, (old, s.count(old))
    s=s.replace(old,new)
rep('''struct StepShared {''','''#ifdef STEP_TRACE_POS
#define TRACE_MAX 200
struct StepTrace {
    unsigned start[TRACE_MAX], wait[TRACE_MAX], done[TRACE_MAX];
    short kind[TRACE_MAX], layer[TRACE_MAX];
    unsigned last_wait;
    int n;
    unsigned long long base;
};
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#endif

struct StepShared {''')
rep('''    int flag;
    unsigned long long full[STEP_STAGES], empty[STEP_STAGES];
''','''    int flag;
    unsigned long long full[STEP_STAGES], empty[STEP_STAGES];
#ifdef STEP_TRACE_POS
    StepTrace tr;
#endif
''')
rep('''    if (known == counter) return;
    if (threadIdx.x == 0) {
        long long start = clock64();
        while (load_acquire(counter) < target) {
            if (clock64() - start > (1ll << 31)) __trap();
        }
    }
    consumers_sync();
    known = counter;''','''    if (known == counter) return;
#ifndef DIAG_NO_WAIT
    if (threadIdx.x == 0) {
        long long start = clock64();
        while (load_acquire(counter) < target) {
            if (clock64() - start > (1ll << 31)) __trap();
        }
    }
#endif
#ifdef STEP_TRACE_POS
    if (threadIdx.x == 0) sh.tr.last_wait = (unsigned)(global_ns() - sh.tr.base);
#endif
    consumers_sync();
    known = counter;''')
rep('''    step_walk(s, chunks, [&](int kind, int layer, int t) {
        if (kind == STEP_EMBED) {
            step_embed<T>(s, sh, t, token, position);''','''#ifdef STEP_TRACE_POS
    if (threadIdx.x == 0) { sh.tr.n = 0; sh.tr.base = global_ns(); }
    bool logged_logits = false;
#endif
    step_walk(s, chunks, [&](int kind, int layer, int t) {
#ifdef STEP_TRACE_POS
        unsigned t0 = 0;
        if (threadIdx.x == 0) { t0 = (unsigned)(global_ns() - sh.tr.base); sh.tr.last_wait = t0; }
#endif
#ifdef DIAG_STREAM_ONLY
        if (kind != STEP_EMBED) {
            int pieces = 1;
            if (kind != STEP_ATTN && kind != STEP_LOGITS) {
                StepProduct P = step_product(s, product_of_kind(kind));
                int sp = t / P.col_blocks, k0 = sp * P.rows, k1 = min(k0 + P.rows, P.k);
                const int piece_rows = STEP_STAGE_BYTES / (STEP_COLUMNS * (int)sizeof(T));
                pieces = (k1 - k0 + piece_rows - 1) / piece_rows;
            }
            for (int i = 0; i < pieces; i++) consume_stage(sh, r, [&](const char*) {});
        }
        if (false)
#endif
        if (kind == STEP_EMBED) {
            step_embed<T>(s, sh, t, token, position);''')
rep('''            step_gemv<T>(s, sh, r, xs, kind, layer, t, position, chunks, known);
        }
    });
    step_finish(s, sh, bv, bi);''','''            step_gemv<T>(s, sh, r, xs, kind, layer, t, position, chunks, known);
        }
#ifdef STEP_TRACE_POS
        if (threadIdx.x == 0 && sh.tr.n < TRACE_MAX && !(kind == STEP_LOGITS && logged_logits)) {
            int i = sh.tr.n++;
            sh.tr.start[i] = t0;
            sh.tr.wait[i] = sh.tr.last_wait;
            sh.tr.done[i] = (unsigned)(global_ns() - sh.tr.base);
            sh.tr.kind[i] = kind;
            sh.tr.layer[i] = layer;
        }
        if (kind == STEP_LOGITS) logged_logits = true;
#endif
    });
#ifdef STEP_TRACE_POS
    unsigned t_end = (unsigned)(global_ns() - sh.tr.base);
#endif
    step_finish(s, sh, bv, bi);
#ifdef STEP_TRACE_POS
    if (threadIdx.x == 0 && position == STEP_TRACE_POS && (blockIdx.x % 33 == 0 || blockIdx.x == 131)) {
        printf("TRACE block %d base %llu end %u finish %u\\n", blockIdx.x, sh.tr.base, t_end, (unsigned)(global_ns() - sh.tr.base));
        for (int i = 0; i < sh.tr.n; i++)
            printf("TRACE %d %d %d %d %u %u %u\\n", blockIdx.x, i, sh.tr.kind[i], sh.tr.layer[i], sh.tr.start[i], sh.tr.wait[i], sh.tr.done[i]);
    }
#endif''')
import re
# Each task's wait on several counters ends its "wait" in the trace too.
s, n = re.subn(r"(\n(\s*)wait_counters\(s,[^;]*\);)", r"\1\n\2STEP_TRACE_WAITED(sh);", s)
assert n >= 3, n
rep('''struct StepShared {''','''#ifdef STEP_TRACE_POS
#define STEP_TRACE_WAITED(sh) if (threadIdx.x == 0) (sh).tr.last_wait = (unsigned)(global_ns() - (sh).tr.base)
#else
#define STEP_TRACE_WAITED(sh)
#endif
struct StepShared {''')
open(sys.argv[1],'w').write(s)
