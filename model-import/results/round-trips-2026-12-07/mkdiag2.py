# usage: mkdiag2.py out.cu source.cu: ../stream-step-2026-12-07/mkdiag.py's trace, plus each
# task's time waiting for its stages' data (thread 0 in consume_stage's mbar_wait), printed as
# an eighth TRACE field (trace2.py reads it).
import os, subprocess, sys
here = os.path.dirname(os.path.abspath(__file__))
subprocess.run([sys.executable, os.path.join(here, "../stream-step-2026-12-07/mkdiag.py"), sys.argv[1], sys.argv[2]], check=True)
s = open(sys.argv[1]).read()
def rep(old, new):
    global s
    assert s.count(old) == 1, (old, s.count(old))
    s = s.replace(old, new)
rep("    unsigned last_wait;\n", "    unsigned last_wait, data_wait, dwait[TRACE_MAX];\n")
rep("""    mbar_wait(&sh.full[at], round & 1);
    use(ring.base""", """#ifdef STEP_TRACE_POS
    unsigned long long w0 = threadIdx.x == 0 ? global_ns() : 0;
#endif
    mbar_wait(&sh.full[at], round & 1);
#ifdef STEP_TRACE_POS
    if (threadIdx.x == 0) sh.tr.data_wait += (unsigned)(global_ns() - w0);
#endif
    use(ring.base""")
rep("if (threadIdx.x == 0) { t0 = (unsigned)(global_ns() - sh.tr.base); sh.tr.last_wait = t0; }",
    "if (threadIdx.x == 0) { t0 = (unsigned)(global_ns() - sh.tr.base); sh.tr.last_wait = t0; sh.tr.data_wait = 0; }")
rep("            sh.tr.layer[i] = layer;\n", "            sh.tr.layer[i] = layer;\n            sh.tr.dwait[i] = sh.tr.data_wait;\n")
rep('printf("TRACE %d %d %d %d %u %u %u\\n", blockIdx.x, i, sh.tr.kind[i], sh.tr.layer[i], sh.tr.start[i], sh.tr.wait[i], sh.tr.done[i]);',
    'printf("TRACE %d %d %d %d %u %u %u %u\\n", blockIdx.x, i, sh.tr.kind[i], sh.tr.layer[i], sh.tr.start[i], sh.tr.wait[i], sh.tr.done[i], sh.tr.dwait[i]);')
s = s.replace("#define TRACE_MAX 200", "#define TRACE_MAX 160")
# With ../pairs-2026-12-07/ll.patch's STEP_LL, the readers poll their inputs in their first
# loop, not on a counter: their "wait" ends once that loop is done (data's round trip included).
if "STEP_LL" in s:
    rep("""            sh.vn[e] = as_stored(v, (const T*)nullptr);
        }
    }
    consumers_sync();
""", """            sh.vn[e] = as_stored(v, (const T*)nullptr);
        }
    }
    consumers_sync();
#if STEP_LL
    STEP_TRACE_WAITED(sh);
#endif
""")
    rep("""    }
    consumers_sync();

    int group = threadIdx.x & 31""", """    }
    consumers_sync();
#if STEP_LL
    if (kind == STEP_MLP || (STEP_LL >= 2 && kind == STEP_PROJ)) STEP_TRACE_WAITED(sh);
#endif

    int group = threadIdx.x & 31""")
open(sys.argv[1], "w").write(s)
