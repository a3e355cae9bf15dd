#!/usr/bin/env bash
# Narrowing the bf16 gpt2 failure (head_dim 13, vocab 2): legs and case variants, burn's GEMM.
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib CUBECL_AUTOTUNE_LEVEL=minimal
bin=/tmp/backend-fuzz; [ -x $bin ] || { xz -dc .dev/backend-fuzz.xz > $bin && chmod +x $bin; }
run() { # leg head_dim vocab lengths heads
  R="{\"case\":{\"act\":\"gelu\",\"head_dim\":$2,\"heads\":$5,\"layers\":1,\"lengths\":$4,\"pad_left\":false,\"seed\":0,\"steps\":2,\"tied\":false,\"vocab\":$3},\"computation\":\"gpt2\"}"
  echo "== $1 head_dim $2 vocab $3 lengths $4 heads $5: $(LLAVA_JP_FUZZ_REPLAY="$R" timeout 40 $bin $1 --exact --include-ignored --nocapture 2>&1 | grep -E "^passes|max \||fails" | head -1 | cut -c1-160)"
}
run cuda_f32_vs_flex 13 2 [1,9] 1
run cuda_autocast_bf16_vs_flex 13 2 [1,9] 1
run cuda_bf16_vs_flex 13 3 [1,9] 1
run cuda_bf16_vs_flex 13 8 [1,9] 1
run cuda_bf16_vs_flex 16 2 [1,9] 1
run cuda_bf16_vs_flex 13 2 [9] 1
run cuda_bf16_vs_flex 13 2 [1] 1
run cuda_bf16_vs_flex 8 2 [1,9] 2
