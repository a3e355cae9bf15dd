#!/usr/bin/env bash
# Call 3: the binary with the flash backward's new defaults (DQ_KEYS 32, DKDV_QUERIES 16, two
# blocks per SM): the CUDA tests again (qkv attention, checkpointed run = plain run, the chunked
# loss); stage 1 at 32 x 608 beside PyTorch; then where a stage-2 step's GPU time goes, per
# kernel, cuBLASLt's included (Nsight Systems when the machine has it; cubecl's profile else).
# Carry .dev with llava-jp.xz, train-test.xz and tokenizer/tokenizer.json.
CALL=call3 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
rm -f /tmp/llava-jp
TEST_TIMEOUT=150 train_tests qkv_attention_matches_the_split_route_on_cuda gradient_checkpointing_gives_the_same_run_on_cuda linear_cross_entropy_matches_burn_on_cuda
CAP=260 train_run stage1 1 8
nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
echo "== nsys: ${nsys:-none} ($((SECONDS - start)) s)"
t=$(( $(left) - 30 )); [ $t -gt 150 ] && t=150
if [ -n "$nsys" ] && [ $t -gt 60 ]; then
  timeout $t $nsys profile -t cuda -o "$out/stage2-nsys" --force-overwrite true \
    /tmp/llava-jp train --config /tmp/bench-train/stage2.toml --backend cuda --set max_steps=8 > "$out/nsys-run.log" 2>&1
  echo "nsys exit $?"; tail -3 "$out/nsys-run.log"
  $nsys stats -r cuda_gpu_kern_sum --format csv -o "$out/stage2" "$out/stage2-nsys.nsys-rep" > /dev/null 2>&1
  ls "$out"/stage2*.csv && head -40 "$out"/stage2*kern_sum*.csv | cut -c1-220
  rm -f "$out/stage2-nsys.nsys-rep" "$out/stage2-nsys.sqlite"
elif [ $t -gt 60 ]; then
  CAP=$t PROFILE=1 train_run stage2-profile 2 6 TORCH=0
  python3 model-import/scripts/cubecl_profile_summary.py "$out/stage2-profile/cubecl-stage2.log" --top 40
  xz -T4 "$out/stage2-profile/cubecl-stage2.log"
fi
finish
