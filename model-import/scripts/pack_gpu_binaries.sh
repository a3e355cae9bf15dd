#!/usr/bin/env bash
# Builds the binaries the GPU calls run (model-import/results/*/call*.sh) from the checked-out
# tree and packs them, stripped and xz-compressed, into .dev/ (git-ignored; the device tool's
# `carry` takes it, 64 MiB in all): llava-jp.xz, train-test.xz (tests/train.rs),
# backend-fuzz.xz, attention-bench.xz, bench-train.xz, graph-decode-test.xz (tests/graph_decode.rs,
# not packed by default), bench-generate.xz (benches/generate.rs, not packed by default). NAMES="llava-jp train-test" packs only
# those; PACK_DIR=dir packs into dir instead of .dev (while a GPU call may be carrying .dev).
# One cargo build at a time: run it alone.
#   usage (repository root): bash model-import/scripts/pack_gpu_binaries.sh
set -euo pipefail
names=${NAMES:-llava-jp train-test backend-fuzz attention-bench bench-train}
dir=${PACK_DIR:-.dev}
mkdir -p "$dir"
# The path of the executable cargo reports for a build (`--message-format json`) of the target
# named $1 (a test or bench builds the package's binaries too, reported in no fixed order).
executable() {
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" | tail -1
}
for name in $names; do
  case $name in
    llava-jp) bin=$(cargo build --release --bin llava-jp --message-format json | executable llava-jp) ;;
    train-test) bin=$(cargo test --release --test train --no-run --message-format json | executable train) ;;
    backend-fuzz) bin=$(cargo test --release --test backend_fuzz --no-run --message-format json | executable backend_fuzz) ;;
    attention-bench) bin=$(cargo bench --bench attention --no-run --message-format json | executable attention) ;;
    bench-train) bin=$(cargo bench --bench train --no-run --message-format json | executable train) ;;
    graph-decode-test) bin=$(cargo test --release --test graph_decode --no-run --message-format json | executable graph_decode) ;;
    bench-generate) bin=$(cargo bench --bench generate --no-run --message-format json | executable generate) ;;
    *) echo "unknown binary $name: expected llava-jp, train-test, backend-fuzz, attention-bench, bench-train, graph-decode-test or bench-generate" >&2; exit 1 ;;
  esac
  [ -x "$bin" ] || { echo "$name: cargo reported no executable" >&2; exit 1; }
  strip -o "/tmp/pack-$name" "$bin"
  xz -T2 -6 -c "/tmp/pack-$name" > "$dir/$name.xz"
  rm -f "/tmp/pack-$name"
  echo "$name: $bin -> $dir/$name.xz ($(du -h "$dir/$name.xz" | cut -f1))"
done
# Which tree the binaries are of, for the next session to check before it calls.
{ echo "$(date -u +%FT%TZ) $names"; git log -1 --format='%H %s' | cut -c1-120; git status --porcelain --untracked-files=no; } > "$dir/packed.txt"
total=$(du -cb "$dir" | tail -1 | cut -f1)
echo "$dir: $((total / 1024 / 1024)) MiB$([ $total -gt $((64 * 1024 * 1024)) ] && echo ', over the 64 MiB carry limit: pack fewer (NAMES=...)')"
