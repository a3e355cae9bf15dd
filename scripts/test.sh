#!/usr/bin/env bash
# The project's test command (README; `.ci/run` calls exactly this). Installs what the tests
# need on a fresh Debian machine, then builds once (release, the demo's profile) and runs every
# test: the CPU backend and the wgpu backend on Mesa's lavapipe when there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

# wgpu needs a Vulkan driver; on a machine without a GPU, lavapipe (software Vulkan) is it.
# The serve page's browser test needs headless Chromium, and Japanese fonts for its screenshot.
missing=()
ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || missing+=(mesa-vulkan-drivers)
command -v chromium >/dev/null 2>&1 || [ -n "${LLAVA_JP_CHROMIUM:-}" ] || missing+=(chromium)
ls /usr/share/fonts/opentype/noto/NotoSansCJK* >/dev/null 2>&1 || missing+=(fonts-noto-cjk)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} for the wgpu and browser tests"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# One target directory outside the clone, so that every clone on this machine shares one build.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if mkdir -p /work/target 2>/dev/null && [ -w /work/target ]; then
    export CARGO_TARGET_DIR=/work/target
  fi
fi

cargo test --release --workspace "$@"
