#!/usr/bin/env bash
# Call 1: the step kernel with ../ln-fold-2026-12-07/ln-fold.patch and ll.patch applied (one
# set of binaries in .dev/next; see README.md). Variants, compiled at run time from the same
# source: F0 normalises first (main's arithmetic: its greedy digest must stay
# e63d96a960f06d45), F1 the fold (the default), L1 the fold with c_attn's and c_fc's partial
# sums as polled pairs (STEP_LL=1), L2 the attention chunks' results as pairs too (STEP_LL=2),
# L0 the pairs without the fold (only if the fold fails). The flex tests decide which
# variants are benched; then each variant twice, traces (mkdiag2.py: with each task's wait for
# its stages' data), transformers' generate on the same prompt, and the streaming warp's knobs.
CALL=${CALL:-call1} BINARIES="next/bench-generate next/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
k=LLAVA_JP_GRAPH_STEP=kernel
declare -A flags=([F0]="-DSTEP_FOLD=0" [F1]="" [L1]="-DSTEP_LL=1" [L2]="-DSTEP_LL=2" [L0]="-DSTEP_FOLD=0 -DSTEP_LL=1")
nv() { echo "LLAVA_JP_GRAPH_NVRTC_OPTIONS=${flags[$1]} ${2:-}"; }
# Both flex tests of a variant; true when both pass.
flex() {
  local ok=0 dtype
  for dtype in bf16 f32; do
    run_test graph_decode_matches_flex_$dtype flex-$dtype-$1 100 "$(nv $1)"
    grep -E "panicked|differ" -A3 "$out/flex-$dtype-$1.log" | head -6
    grep -q "test result: ok" "$out/flex-$dtype-$1.log" || ok=1
  done
  return $ok
}
valid="F0"
flex F1 && valid="$valid F1"
flex L1 && valid="$valid L1"
flex L2 && valid="$valid L2"
case " $valid " in *" F1 "*) ;; *) flex L0 && valid="$valid L0" ;; esac
echo "== variants that passed: $valid"
for round in a b; do
  for v in $valid; do bench $v$round bench-generate 1 $k "$(nv $v)" > /dev/null; stepms $v$round; done
done
best=${valid##* }
# Traces of the fold alone and of the last variant that passed (or of F0 if none did).
for v in $(echo "$valid" | tr ' ' '\n' | grep -E "^F1$|^$best$" | sort -u); do
  python3 model-import/results/round-trips-2026-12-07/mkdiag2.py /tmp/diag.cu src/graph_decode.cu
  bench trace-$v bench-generate 1 $k LLAVA_JP_GRAPH_SOURCE=/tmp/diag.cu "$(nv $v -DSTEP_TRACE_POS=650)" > /dev/null; stepms trace-$v
  python3 model-import/results/round-trips-2026-12-07/trace2.py $out/trace-$v.jsonl
done
# transformers' generate on the same prompt (the issue's table), before the knobs, which matter less.
transformers 90
for knob in -DSTEP_INFLIGHT=2 -DSTEP_INFLIGHT=3 -DSTEP_STAGES=4; do
  name=$best${knob#-DSTEP_}; name=${name//=/}
  bench $name bench-generate 1 $k "$(nv $best $knob)" > /dev/null; stepms $name
done
decode_summary
finish
