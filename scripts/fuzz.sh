#!/usr/bin/env bash
# Runs each fuzz target for FUZZ_SECONDS (default 30) and fails on any crash.
# The targets (fuzz/fuzz_targets/) cover what peers send before anything else
# checks it: Range headers, paths, and WebSocket frames and messages.
#
# cargo-fuzz drives libFuzzer through compiler flags that are nightly-only;
# RUSTC_BOOTSTRAP lets this stable toolchain accept them, and the sanitizer is
# off (it needs a nightly standard library). A debug build keeps overflow
# checks and debug assertions on and compiles faster than a release one.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-30}
for target in range_header remote_path ws_frame; do
  mkdir -p "corpus/$target"
  echo "fuzzing $target for ${seconds}s"
  log="corpus/$target.log"
  if ! cargo fuzz run --dev --sanitizer none "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz target $target failed; the input is under fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E "^Done" "$log"
done
