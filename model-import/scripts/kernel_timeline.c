// A kernel timeline of any CUDA process, for a machine without Nsight Systems: loaded by the
// CUDA driver at cuInit through CUDA_INJECTION64_PATH, it asks CUPTI's activity API for every
// kernel, copy, memset and synchronisation with its start and end (ns, one clock for all
// streams) and writes them as tab-separated lines to $KERNEL_TIMELINE_OUT.<pid> (every CUDA
// process the variable reaches writes its own) as CUPTI hands its buffers back, so a run cut short keeps what completed. `kernel_timeline.py` reads the file:
// where the device sat idle between kernels, and after what.
//
// Build (headers from the nvidia-cuda-cupti-cu12 and nvidia-cuda-runtime-cu12 wheels; the
// library from the same CUPTI wheel at run time, on LD_LIBRARY_PATH):
//   gcc -O2 -shared -fPIC -o libkernel_timeline.so kernel_timeline.c -I$CUPTI/include
//       -I$RUNTIME/include -I$NVCC/include -L$CUPTI/lib -l:libcupti.so.12
// ($NVCC: the nvidia-cuda-nvcc-cu12 wheel's, for crt/host_defines.h)
// Run:
//   CUDA_INJECTION64_PATH=$PWD/libkernel_timeline.so KERNEL_TIMELINE_OUT=t.tsv
//       LD_LIBRARY_PATH=$CUPTI/lib ./program ...
// Lines: K start end stream name | M start end stream bytes copy_kind | S start end stream
// memset bytes | Y start end stream sync_type (1 event, 2 stream-wait-event, 3 stream,
// 4 context).

#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>

#define BUFFER_BYTES (4u << 20)

static FILE* out;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void fail(const char* what, CUptiResult r) {
    const char* text = "?";
    cuptiGetResultString(r, &text);
    fprintf(stderr, "kernel_timeline: %s failed: %s\n", what, text);
}

static void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
    *buffer = (uint8_t*)aligned_alloc(8, BUFFER_BYTES);
    *size = *buffer ? BUFFER_BYTES : 0;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t size, size_t valid) {
    (void)ctx;
    (void)stream;
    (void)size;
    CUpti_Activity* record = NULL;
    pthread_mutex_lock(&out_lock);
    while (out && cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        switch (record->kind) {
        case CUPTI_ACTIVITY_KIND_KERNEL:
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
            const CUpti_ActivityKernel9* k = (const CUpti_ActivityKernel9*)record;
            fprintf(out, "K\t%llu\t%llu\t%u\t%s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                    k->streamId, k->name ? k->name : "?");
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            const CUpti_ActivityMemcpy6* m = (const CUpti_ActivityMemcpy6*)record;
            fprintf(out, "M\t%llu\t%llu\t%u\t%llu\t%u\n", (unsigned long long)m->start, (unsigned long long)m->end,
                    m->streamId, (unsigned long long)m->bytes, (unsigned)m->copyKind);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMSET: {
            const CUpti_ActivityMemset4* m = (const CUpti_ActivityMemset4*)record;
            fprintf(out, "S\t%llu\t%llu\t%u\t%llu\n", (unsigned long long)m->start, (unsigned long long)m->end,
                    m->streamId, (unsigned long long)m->bytes);
            break;
        }
        case CUPTI_ACTIVITY_KIND_SYNCHRONIZATION: {
            const CUpti_ActivitySynchronization2* s = (const CUpti_ActivitySynchronization2*)record;
            fprintf(out, "Y\t%llu\t%llu\t%u\t%u\n", (unsigned long long)s->start, (unsigned long long)s->end,
                    s->streamId, (unsigned)s->type);
            break;
        }
        default:
            break;
        }
    }
    if (out) fflush(out);
    pthread_mutex_unlock(&out_lock);
    size_t dropped = 0;
    if (cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped) == CUPTI_SUCCESS && dropped)
        fprintf(stderr, "kernel_timeline: %zu records dropped\n", dropped);
    free(buffer);
}

static void finish(void) {
    cuptiActivityFlushAll(1);
    pthread_mutex_lock(&out_lock);
    if (out) fclose(out);
    out = NULL;
    pthread_mutex_unlock(&out_lock);
}

// The driver calls this once, at cuInit, in a process started with CUDA_INJECTION64_PATH.
int InitializeInjection(void) {
    const char* base = getenv("KERNEL_TIMELINE_OUT");
    char path[4096];
    snprintf(path, sizeof path, "%s.%d", base ? base : "kernel_timeline.tsv", (int)getpid());
    out = fopen(path, "w");
    if (!out) {
        fprintf(stderr, "kernel_timeline: cannot write %s\n", path);
        return 0;
    }
    CUptiResult r = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
    if (r != CUPTI_SUCCESS) {
        fail("cuptiActivityRegisterCallbacks", r);
        return 0;
    }
    const CUpti_ActivityKind kinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                                        CUPTI_ACTIVITY_KIND_MEMSET, CUPTI_ACTIVITY_KIND_SYNCHRONIZATION};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; ++i)
        if ((r = cuptiActivityEnable(kinds[i])) != CUPTI_SUCCESS) fail("cuptiActivityEnable", r);
    atexit(finish);
    return 1;
}
