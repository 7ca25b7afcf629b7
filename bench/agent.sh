#!/usr/bin/env bash
# bench/agent.sh: ferry-agent measured against `rclone copy` to
# `rclone serve webdav`, everything on loopback and on the same filesystem.
#
#   1. Initial sync of MANY files (sizes log-uniform between 4 KiB and 1 MiB,
#      in 100 directories) and of one BIG_MIB file: `ferry-agent once` to a
#      fresh `ferry serve` store vs `rclone copy` to a fresh webdav store.
#      Wall time, CPU (user+sys) and peak RSS of the client, medians of RUNS
#      runs taken in turns; every run is checked (file count and bytes stored).
#   2. Change-to-commit latency of single-file edits (EDITS edits of 4 KiB
#      files) under `ferry-agent run`: from the write to the commit seen on
#      the server's change feed (`ferry watch`). p50 and p99. This includes
#      the agent's settle time (a file is pushed once its writer closed it,
#      or once it has not changed for 2 s), which is on purpose: it is what
#      a user waits.
#   3. Idle CPU of `ferry-agent run` over IDLE_SECS seconds, watching the
#      synced MANY-file folder.
#   4. RSS of `ferry-agent run` tracking TRACKED files (64-byte files in 1000
#      directories), after its initial sync, and how long that sync took.
#
# Writes the "## agent (ferry-agent vs rclone copy)" section of
# bench/RESULTS.md (replacing an older one) and prints it.
#
# Environment knobs (defaults in brackets):
#   BENCH_DIR   work directory [/tmp/ferry-agent-bench]
#   RUNS        repetitions of each initial sync [3]
#   MANY        files in the many-files set [10000]
#   BIG_MIB     size of the big file in MiB [2048]
#   EDITS       edits timed for the latency [100]
#   IDLE_SECS   idle CPU sampling window [60]
#   TRACKED     files for the RSS measurement [100000]
#   TRANSFERS   --transfers for both tools [4]
#   RESULTS     file to update [bench/RESULTS.md]
#   SKIP_BUILD  set to 1 to use the existing target/release binaries
#
# Needs python3; installs rclone and GNU time with apt-get when missing.
# Safe to re-run: data sets are reused, stores are recreated, processes are
# stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${BENCH_DIR:-/tmp/ferry-agent-bench}
RUNS=${RUNS:-3}
MANY=${MANY:-10000}
BIG_MIB=${BIG_MIB:-2048}
EDITS=${EDITS:-100}
IDLE_SECS=${IDLE_SECS:-60}
TRACKED=${TRACKED:-100000}
TRANSFERS=${TRANSFERS:-4}
RESULTS=${RESULTS:-$ROOT/bench/RESULTS.md}
SECTION_TITLE="## agent (ferry-agent vs rclone copy)"
FERRY=$ROOT/target/release/ferry
AGENT=$ROOT/target/release/ferry-agent

log() { printf '[agent.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

# ------------------------------------------------------------ tools
need_apt=()
command -v rclone >/dev/null || need_apt+=(rclone)
[ -x /usr/bin/time ] || need_apt+=(time)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need_apt[@]}"
fi
command -v python3 >/dev/null || die "python3 is needed"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building release binaries"
  (cd "$ROOT" && cargo build --release -p ferry --bin ferry -p ferry-agent --bin ferry-agent)
fi
[ -x "$FERRY" ] && [ -x "$AGENT" ] || die "missing $FERRY or $AGENT"

mkdir -p "$WORK"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# ------------------------------------------------------------ data sets
# Random content, fixed seed for sizes; mtimes an hour old so nothing waits
# to settle (the settle time is measured separately, in the latency part).
make_many() {
  local dir=$1 count=$2 min=$3 max=$4 dirs=$5
  if [ -f "$dir.complete" ] && [ "$(cat "$dir.complete")" = "$count $min $max" ]; then
    return
  fi
  log "creating $count files in $dir"
  rm -rf "$dir"
  python3 - "$dir" "$count" "$min" "$max" "$dirs" <<'EOF'
import math, os, random, sys, time
root, count, lo, hi, dirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(7)
old = time.time() - 3600
for i in range(count):
    d = os.path.join(root, f"dir{i % dirs:04d}")
    os.makedirs(d, exist_ok=True)
    size = lo if lo == hi else int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    path = os.path.join(d, f"file{i:06d}.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    os.utime(path, (old, old))
EOF
  echo "$count $min $max" >"$dir.complete"
}

MANY_DIR=$WORK/many
BIG_DIR=$WORK/big
TRACKED_DIR=$WORK/tracked
make_many "$MANY_DIR" "$MANY" 4096 1048576 100
if [ ! -f "$BIG_DIR/big.bin" ] || [ "$(stat -c %s "$BIG_DIR/big.bin")" != $((BIG_MIB << 20)) ]; then
  log "creating a $BIG_MIB MiB file"
  mkdir -p "$BIG_DIR"
  head -c $((BIG_MIB << 20)) /dev/urandom >"$BIG_DIR/big.bin"
  touch -d '1 hour ago' "$BIG_DIR/big.bin"
fi
bytes_of() { find "$1" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
files_of() { find "$1" -type f | wc -l; }

# ------------------------------------------------------------ servers
FERRY_URL=""
FERRY_PID=""
start_ferry() {
  local store=$1
  rm -rf "$store"
  mkdir -p "$store"
  # Emptied here, not by the redirection below: that happens in the child,
  # possibly after the loop has read the previous server's address.
  : >"$WORK/ferry.out"
  "$FERRY" serve --store "$store" --listen 127.0.0.1:0 >>"$WORK/ferry.out" 2>>"$WORK/ferry.err" &
  FERRY_PID=$!
  PIDS+=("$FERRY_PID")
  for _ in $(seq 100); do
    FERRY_URL=$(grep -o 'http://[0-9.:]*' "$WORK/ferry.out" | head -1 || true)
    [ -n "$FERRY_URL" ] && return
    sleep 0.1
  done
  die "ferry serve did not start (see $WORK/ferry.err)"
}
stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

RCLONE_PORT=""
RCLONE_PID=""
start_rclone() {
  local store=$1
  rm -rf "$store"
  mkdir -p "$store"
  RCLONE_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  rclone serve webdav "$store" --addr "127.0.0.1:$RCLONE_PORT" >>"$WORK/rclone-serve.log" 2>&1 &
  RCLONE_PID=$!
  PIDS+=("$RCLONE_PID")
  for _ in $(seq 100); do
    curl -fs -o /dev/null -X PROPFIND -H 'Depth: 0' "http://127.0.0.1:$RCLONE_PORT/" && return
    sleep 0.1
  done
  die "rclone serve webdav did not start (see $WORK/rclone-serve.log)"
}

# Runs a command under GNU time; appends "wall cpu maxrss_kib" to $1.
timed() {
  local out=$1
  shift
  /usr/bin/time -f '%e %U %S %M' -o "$WORK/time.txt" "$@" >>"$WORK/client.log" 2>&1 ||
    die "failed: $* (see $WORK/client.log)"
  awk '{printf "%s %.2f %s\n", $1, $2 + $3, $4}' "$WORK/time.txt" >>"$out"
}

# The stored files under a store (ferry keeps its own state under .ferry/).
check_store() {
  local store=$1 src=$2 what=$3
  local want_files want_bytes got_files got_bytes
  want_files=$(files_of "$src")
  want_bytes=$(bytes_of "$src")
  got_files=$(find "$store" -path "$store/.ferry" -prune -o -type f -print | wc -l)
  got_bytes=$(find "$store" -path "$store/.ferry" -prune -o -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
  [ "$got_files" = "$want_files" ] && [ "$got_bytes" = "$want_bytes" ] ||
    die "$what: stored $got_files files / $got_bytes bytes, expected $want_files / $want_bytes"
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2}'; }

# ------------------------------------------------------------ 1. initial sync
# Each run starts from an empty store and, for ferry-agent, an empty journal
# kept outside the folder.
sync_ferry() {
  local src=$1 out=$2
  start_ferry "$WORK/ferry-store"
  rm -rf "$WORK/agent-state"
  timed "$out" "$AGENT" once --dir "$src" --server "$FERRY_URL" --prefix bench \
    --state "$WORK/agent-state" --transfers "$TRANSFERS"
  stop_pid "$FERRY_PID"
  check_store "$WORK/ferry-store/bench" "$src" "ferry-agent $(basename "$src")"
}
sync_rclone() {
  local src=$1 out=$2
  start_rclone "$WORK/rclone-store"
  timed "$out" rclone copy "$src" :webdav: --webdav-url "http://127.0.0.1:$RCLONE_PORT" \
    --transfers "$TRANSFERS"
  stop_pid "$RCLONE_PID"
  check_store "$WORK/rclone-store" "$src" "rclone $(basename "$src")"
}

: >"$WORK/client.log"
for set in many big; do
  src=$WORK/$set
  : >"$WORK/ferry-$set.txt"
  : >"$WORK/rclone-$set.txt"
  for run in $(seq "$RUNS"); do
    log "initial sync of $set, run $run/$RUNS"
    if [ $((run % 2)) = 1 ]; then
      sync_ferry "$src" "$WORK/ferry-$set.txt"
      sync_rclone "$src" "$WORK/rclone-$set.txt"
    else
      sync_rclone "$src" "$WORK/rclone-$set.txt"
      sync_ferry "$src" "$WORK/ferry-$set.txt"
    fi
  done
done

# ------------------------------------------------------------ 2. latency
log "change-to-commit latency, $EDITS edits"
LAT_DIR=$WORK/latency
rm -rf "$LAT_DIR" "$WORK/latency-state"
mkdir -p "$LAT_DIR"
for i in $(seq 0 19); do head -c 4096 /dev/urandom >"$LAT_DIR/doc$i.txt"; done
touch -d '1 hour ago' "$LAT_DIR"/*
start_ferry "$WORK/ferry-store"
"$AGENT" run --dir "$LAT_DIR" --server "$FERRY_URL" --prefix lat --state "$WORK/latency-state" \
  2>"$WORK/agent-latency.log" &
LAT_AGENT=$!
PIDS+=("$LAT_AGENT")
for _ in $(seq 300); do
  grep -q 'full pass' "$WORK/agent-latency.log" && break
  sleep 0.1
done
grep -q 'full pass' "$WORK/agent-latency.log" || die "the agent did not sync (see $WORK/agent-latency.log)"
python3 - "$FERRY" "$FERRY_URL" "$LAT_DIR" "$EDITS" >"$WORK/latency.txt" <<'EOF'
import json, os, queue, subprocess, sys, threading, time
ferry, url, folder, edits = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
feed = subprocess.Popen([ferry, "watch", "lat", "--server", url], stdout=subprocess.PIPE, text=True)
lines = queue.Queue()
threading.Thread(target=lambda: [lines.put(l) for l in feed.stdout], daemon=True).start()
time.sleep(1.0)  # the feed connects
for i in range(edits):
    name = f"doc{i % 20}.txt"
    with open(os.path.join(folder, name), "wb") as f:
        f.write(os.urandom(4096))
    start = time.monotonic()
    while True:
        try:
            change = json.loads(lines.get(timeout=30))
        except queue.Empty:
            sys.exit(f"no commit of {name} within 30 s")
        if change.get("path") == f"lat/{name}":
            print(f"{time.monotonic() - start:.3f}")
            break
    time.sleep(0.2)
feed.kill()
EOF
stop_pid "$LAT_AGENT"
stop_pid "$FERRY_PID"
pct() { sort -n "$1" | awk -v p="$2" '{a[NR]=$1} END {i=int((NR*p+99)/100); if (i<1) i=1; print a[i]}'; }
LAT_P50=$(pct "$WORK/latency.txt" 50)
LAT_P99=$(pct "$WORK/latency.txt" 99)

# ------------------------------------------------------------ 3. idle CPU
log "idle CPU over $IDLE_SECS s (watching $MANY files)"
start_ferry "$WORK/ferry-store"
rm -rf "$WORK/idle-state"
"$AGENT" once --dir "$MANY_DIR" --server "$FERRY_URL" --prefix idle --state "$WORK/idle-state" 2>>"$WORK/client.log"
"$AGENT" run --dir "$MANY_DIR" --server "$FERRY_URL" --prefix idle --state "$WORK/idle-state" \
  2>"$WORK/agent-idle.log" &
IDLE_AGENT=$!
PIDS+=("$IDLE_AGENT")
for _ in $(seq 600); do
  grep -q 'full pass' "$WORK/agent-idle.log" && break
  sleep 0.1
done
sleep 5
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
T0=$(ticks "$IDLE_AGENT")
sleep "$IDLE_SECS"
T1=$(ticks "$IDLE_AGENT")
IDLE_CPU=$(awk -v a="$T0" -v b="$T1" -v hz="$HZ" -v s="$IDLE_SECS" 'BEGIN {printf "%.3f", (b - a) / hz / s * 100}')
IDLE_RSS=$(awk '/VmRSS/ {print $2}' "/proc/$IDLE_AGENT/status")
stop_pid "$IDLE_AGENT"
stop_pid "$FERRY_PID"

# ------------------------------------------------------------ 4. RSS with many tracked files
log "RSS while tracking $TRACKED files"
make_many "$TRACKED_DIR" "$TRACKED" 64 64 1000
start_ferry "$WORK/ferry-store"
rm -rf "$WORK/tracked-state"
TRACK_START=$(date +%s.%N)
"$AGENT" run --dir "$TRACKED_DIR" --server "$FERRY_URL" --prefix tracked --state "$WORK/tracked-state" \
  --transfers "$TRANSFERS" 2>"$WORK/agent-tracked.log" &
TRACK_AGENT=$!
PIDS+=("$TRACK_AGENT")
while ! "$AGENT" status --dir "$TRACKED_DIR" --state "$WORK/tracked-state" 2>/dev/null |
  grep -q "synced: *$TRACKED files"; do
  kill -0 "$TRACK_AGENT" 2>/dev/null || die "the agent exited (see $WORK/agent-tracked.log)"
  sleep 1
done
TRACK_SECS=$(awk -v a="$TRACK_START" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
sleep 5
TRACK_RSS=$(awk '/VmRSS/ {print $2}' "/proc/$TRACK_AGENT/status")
TRACK_HWM=$(awk '/VmHWM/ {print $2}' "/proc/$TRACK_AGENT/status")
stop_pid "$TRACK_AGENT"
stop_pid "$FERRY_PID"

# ------------------------------------------------------------ report
col() { awk -v c="$2" '{print $c}' "$1" | median; }
mib() { awk -v k="$1" 'BEGIN {printf "%.0f", k / 1024}'; }
MANY_BYTES=$(bytes_of "$MANY_DIR")
BIG_BYTES=$((BIG_MIB << 20))
rate() { awk -v b="$1" -v s="$2" 'BEGIN {if (s > 0) printf "%.0f", b / s / 1048576; else print "-"}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}'; }
SECTION=$WORK/section.md
{
  echo "$SECTION_TITLE"
  echo
  echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, loopback, one filesystem;"
  echo "release builds; both tools with $TRANSFERS transfers; medians of $RUNS runs taken in turns."
  echo
  echo "| initial sync | tool | wall s | MiB/s | client CPU s | client peak RSS MiB | time vs rclone |"
  echo "|---|---|---|---|---|---|---|"
  for set in many big; do
    if [ $set = many ]; then
      label="$MANY files, 4 KiB–1 MiB ($((MANY_BYTES >> 20)) MiB)"
      bytes=$MANY_BYTES
    else
      label="one $BIG_MIB MiB file"
      bytes=$BIG_BYTES
    fi
    fw=$(col "$WORK/ferry-$set.txt" 1)
    rw=$(col "$WORK/rclone-$set.txt" 1)
    echo "| $label | ferry-agent once | $fw | $(rate "$bytes" "$fw") | $(col "$WORK/ferry-$set.txt" 2) | $(mib "$(col "$WORK/ferry-$set.txt" 3)") | $(ratio "$fw" "$rw") |"
    echo "| $label | rclone copy (webdav) | $rw | $(rate "$bytes" "$rw") | $(col "$WORK/rclone-$set.txt" 2) | $(mib "$(col "$WORK/rclone-$set.txt" 3)") | 1.00 |"
  done
  echo
  echo "| ferry-agent run | value |"
  echo "|---|---|"
  echo "| change-to-commit latency, single 4 KiB edits (p50 / p99, $EDITS edits; each written and closed; includes the settle time) | ${LAT_P50} s / ${LAT_P99} s |"
  echo "| idle CPU watching $MANY files, over $IDLE_SECS s | ${IDLE_CPU} % of one core (RSS $(mib "$IDLE_RSS") MiB) |"
  echo "| RSS tracking $TRACKED files, after the initial sync (peak) | $(mib "$TRACK_RSS") MiB ($(mib "$TRACK_HWM") MiB) |"
  echo "| initial sync of those $TRACKED 64-byte files | ${TRACK_SECS} s |"
  echo
  echo "Every initial sync was checked: the store held as many files and bytes as the source."
  echo
} >"$SECTION"

[ -f "$RESULTS" ] || printf '# Benchmark results\n\n' >"$RESULTS"
awk -v secfile="$SECTION" -v title="$SECTION_TITLE" '
  BEGIN { while ((getline l < secfile) > 0) sec = sec l "\n" }
  $0 == title { printf "%s", sec; skip = 1; done = 1; next }
  skip && /^## / { skip = 0 }
  !skip { print; last = $0 }
  END { if (!done) { if (NR && last != "") print ""; printf "%s", sec } }
' "$RESULTS" >"$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"

echo
cat "$SECTION"
log "wrote $RESULTS; logs in $WORK (client.log, agent-*.log, ferry.err, rclone-serve.log)"
