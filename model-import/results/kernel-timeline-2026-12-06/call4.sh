#!/usr/bin/env bash
# Call 4: the tree to be submitted. CUDA tests touched by this session (the products on
# cubecl's stream, with several cubecl streams in the replicas' test; the chunk totals now one
# device function; the frozen casts' sync), greedy decode at batch 1 beside transformers, then
# stage 2 and stage 1 beside PyTorch. Carry .dev (llava-jp.xz, train-test.xz,
# bench-generate.xz, tokenizer/, cupti/).
CALL=${CALL:-call4} BINARIES="train-test bench-generate"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-580}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TEST_TIMEOUT=120 train_tests cublaslt_on_cubecl_stream_matches_the_flag_route_on_cuda fused_layer_norm_matches_burn_on_cuda \
  precast_frozen_weights_match_on_cuda data_parallel_replicas_equal_accumulation_on_one_device_on_cuda
bench ours bench-generate 3
transformers 100
rm -f /tmp/llava-jp
CAP=170 train_run stage2 2 8
CAP=160 train_run stage1 1 6
losses
finish
