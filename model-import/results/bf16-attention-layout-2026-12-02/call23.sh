#!/usr/bin/env bash
# The cuBLASLt route's old failures (llava f32 at GPT-2 head width 1; decode at one head, batch 2): as given vs row-major attention operands.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib CUBECL_AUTOTUNE_LEVEL=minimal RAYON_NUM_THREADS=2 LLAVA_JP_GEMM=cublaslt
bin=/tmp/backend-fuzz; xz -dc .dev/backend-fuzz.xz > $bin && chmod +x $bin
L='{"case":{"clip":{"act":"quick_gelu","grid":1,"head_dim":4,"heads":1,"images":1,"layers":1,"mlp_ratio":2,"patch":3,"seed":6082495666602199809},"cls_patch":false,"gpt_head_dim":1,"gpt_heads":2,"gpt_layers":1,"max_length":7,"pad_left":false,"projector":"linear","samples":[{"images":0,"labelled":true,"text":9}],"seed":18203789242947154104,"select_layer":-1,"vocab":9},"computation":"llava forward and loss"}'
D9='{"case":{"act":"gelu","head_dim":9,"heads":1,"layers":1,"lengths":[5,3],"pad_left":false,"seed":0,"steps":3,"tied":false,"vocab":2},"computation":"kv-cached decode"}'
D16='{"case":{"act":"gelu","head_dim":16,"heads":1,"layers":1,"lengths":[4,1],"pad_left":false,"seed":0,"steps":3,"tied":false,"vocab":2},"computation":"kv-cached decode"}'
r() { LLAVA_JP_ATTENTION_LAYOUT=$2 LLAVA_JP_FUZZ_REPLAY="$4" timeout 200 $bin $3 --exact --include-ignored --nocapture > $OUT/$1.log 2>&1; echo "== $1 ($2, $3): rc $? $(grep -E "^passes|^llava|^kv-cached|^fails" $OUT/$1.log | head -1 | cut -c1-330)" >> $OUT/summary.txt; }
r llava-given given cuda_f32_vs_flex "$L" & r llava-row canonical cuda_f32_vs_flex "$L" &
r d9-given given cuda_f32_vs_flex "$D9" & r d9-row canonical cuda_f32_vs_flex "$D9" &
r d9b-given given cuda_bf16_vs_flex "$D9" & r d9b-row canonical cuda_bf16_vs_flex "$D9" &
r d16-given given cuda_f32_vs_flex "$D16" & r d16-row canonical cuda_f32_vs_flex "$D16" &
wait; cat $OUT/summary.txt
