#!/usr/bin/env bash
# Call 5: call 4's graph-decoder cases that ran out of time compiling, again on the machine
# call 4 warmed (its kernel cache). Carry .dev with graph-decode-test.xz.
CALL=call5 BINARIES="graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
for c in 4 0; do
  run_test graph_decode_matches_eager_bf16 eager-bf16-case$c $(( $(left) > 230 ? 220 : $(left) - 10 )) GRAPH_DECODE_CASES=$c
done
finish
