#!/usr/bin/env bash
# Targeted replays: burn's attention (bf16, CUDA) on packed q/k/v with one head, as given vs canonical layout.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib CUBECL_AUTOTUNE_LEVEL=minimal RAYON_NUM_THREADS=2 LLAVA_JP_ATTENTION=burn
bin=/tmp/backend-fuzz; xz -dc .dev/backend-fuzz.xz > $bin && chmod +x $bin
mkdir -p $OUT/r
att() { # name layout-env heads layout head_dim
  R="{\"computation\":\"attention\",\"case\":{\"seed\":0,\"batch\":2,\"heads\":$3,\"queries\":11,\"past\":0,\"head_dim\":${5:-13},\"mask\":\"CausalPadded\",\"scale_factor\":1.0,\"layout\":\"$4\"}}"
  LLAVA_JP_ATTENTION_LAYOUT=$2 LLAVA_JP_FUZZ_REPLAY="$R" timeout 200 $bin cuda_bf16_vs_flex --exact --include-ignored --nocapture > $OUT/r/$1.log 2>&1
  echo "== $1: rc $? $(grep -E "^passes|^attention:" $OUT/r/$1.log | head -1 | cut -c1-260)" >> $OUT/r/summary.txt
}
g() { # name layout-env
  R='{"case":{"act":"gelu","head_dim":13,"heads":1,"layers":1,"lengths":[1,9],"pad_left":false,"seed":0,"steps":2,"tied":false,"vocab":2},"computation":"gpt2"}'
  LLAVA_JP_ATTENTION_LAYOUT=$2 LLAVA_JP_FUZZ_REPLAY="$R" timeout 200 $bin cuda_bf16_vs_flex --exact --include-ignored --nocapture > $OUT/r/$1.log 2>&1
  echo "== $1: rc $? $(grep -E "^passes|^gpt2:" $OUT/r/$1.log | head -1 | cut -c1-260)" >> $OUT/r/summary.txt
}
att p1a given 1 Packed & att p1b given 1 Packed & att p1c given 1 Packed &
att p2 given 2 Packed & att s1 given 1 Separate & att p1hd8 given 1 Packed 8 &
att c1a canonical 1 Packed & att c1b canonical 1 Packed & att c2 canonical 2 Packed &
g ga given & g gb given & g gc canonical & g gd canonical &
wait; cat $OUT/r/summary.txt
