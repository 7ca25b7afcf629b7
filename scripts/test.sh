#!/usr/bin/env bash
# Installs what the tests need, then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

# Real FUSE mounts (fuse3) and real media tools (ffmpeg) in the mount tests.
if ! command -v fusermount3 >/dev/null 2>&1 || ! command -v ffprobe >/dev/null 2>&1; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y fuse3 ffmpeg
fi

# The independent WebSocket client test is written in Python.
if ! python3 -c 'import websockets' 2>/dev/null; then
  python3 -m pip install --quiet 'websockets>=13'
fi

cargo nextest run --workspace --all-features --no-fail-fast
# nextest does not run doctests.
cargo test --workspace --all-features --doc
# The unit tests once more as a default build (the quickstart's) is compiled:
# features change which TLS providers exist.
cargo nextest run -p ferry --lib

# Each fuzz target briefly (FUZZ_SECONDS, default 30): parsers of what peers send.
bash scripts/fuzz.sh
