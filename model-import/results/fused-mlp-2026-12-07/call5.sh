#!/usr/bin/env bash
# Call 5: the fused MLP (c_fc by columns, as the call-2 binaries upload it) in clusters of 1, 2,
# 4 and 8 blocks (.dev/ap/clusters.cu: the source with MLP_CLUSTER settable), attention apart:
# does the cluster size bound how fast it streams?
CALL=${CALL:-call5} BINARIES="ap/bench-generate"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
export LLAVA_JP_GRAPH_ATTENTION=split LLAVA_JP_GRAPH_SOURCE=.dev/ap/clusters.cu
for c in 8 4 2 1; do
  bench cluster$c bench-generate 1 LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DMLP_CLUSTER=$c > /dev/null
done
bench split bench-generate 1 LLAVA_JP_GRAPH_MLP=split > /dev/null
decode_summary
finish
