#!/usr/bin/env bash
# Call 4: the LayerNorm kernel test with its bf16 inference part mended (burn draws random
# tensors in f32; they are cast now), and the graph decoder's CUDA-referenced bf16 cases, whose
# eager reference now takes the LayerNorm kernel. Carry .dev with train-test.xz and
# graph-decode-test.xz.
CALL=call4 BINARIES="train-test graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
timeout 150 /tmp/train-test --ignored --exact fused_layer_norm_matches_burn_on_cuda --nocapture > "$out/layer-norm-test.log" 2>&1
echo "== layer norm test: $(grep -E 'test result|panicked' "$out/layer-norm-test.log" | head -3) ($((SECONDS - start)) s)"
grep -A3 panicked "$out/layer-norm-test.log" | head -6
for c in 4 5 0; do
  run_test graph_decode_matches_eager_bf16 eager-bf16-case$c $(( $(left) > 150 ? 140 : $(left) - 10 )) GRAPH_DECODE_CASES=$c
done
finish
