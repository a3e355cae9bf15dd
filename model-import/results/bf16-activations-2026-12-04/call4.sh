#!/usr/bin/env bash
# Call 4: AdamW and the gradient norm taking four elements a thread (and the norm over more
# blocks), the column sums unrolled. The fused optimizer's test, the checkpointed run against
# the plain one (bf16, both stages; call 3 gave it too little time); stage 2 at 8 x 1024 beside
# PyTorch; stage 2 at 1 x 1024 with gradient checkpointing beside a ballast leaving 24 GiB; then
# the backend fuzzer's CUDA autocast leg (against flex in f32, ill-conditioned cases set aside)
# in the time left.
# Carry .dev with llava-jp.xz, train-test.xz, backend-fuzz.xz and tokenizer/tokenizer.json.
CALL=call4 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
rm -f /tmp/llava-jp
TEST_TIMEOUT=200 train_tests fused_optimizer_matches_burn_on_cuda gradient_checkpointing_gives_the_same_run_on_cuda
CAP=170 train_run stage2 2 12
CAP=100 train_run batch1-checkpointing-24gib 2 12 TORCH=0 LEAVE_GIB=24 TRAIN_SET="per_device_train_batch_size=1 gradient_checkpointing=true"
t=$(( $(left) - 25 ))
if [ $t -gt 80 ]; then
  echo "== fuzz, cuda_autocast_bf16_vs_flex ($((SECONDS - start)) s, $t s allowed)"
  LEGS=cuda_autocast_bf16_vs_flex FUZZ_SECONDS=$(( t - 50 )) LEG_TIMEOUT=$(( t - 10 )) timeout $t \
    bash model-import/scripts/gpu_backend_fuzz.sh "$out/fuzz" 2>&1 | tail -22
fi
finish
