#!/usr/bin/env bash
# bench/mount-write.sh: writing through `ferry mount` against `rclone mount
# --vfs-cache-mode writes` of `rclone serve webdav`, and the local disk.
#
# Three workloads, each RUNS times per client (medians quoted; the client
# order rotates every round):
#   * dd:    dd if=/dev/zero of=DIR/dd.bin bs=1M count=1024 conv=fsync
#   * cp:    cp of a 1 GiB random file (in the page cache) into DIR
#   * untar: tar -xf of 10,000 small files (100 B to 16 KiB, 100 directories)
# For every run: the wall time of the command, and the time until the
# server's store holds all of it ("committed": the file at its full size,
# or every file of the tree with every byte). On the local disk the two are
# the same. Every measurement gets a fresh server on an empty store and a
# fresh mount with an empty cache directory; store, cache directories, the
# source files and the local target all live on one filesystem.
#
# rclone runs with --vfs-write-back RCLONE_WRITE_BACK (default 0s): its
# default of 5 s would add a timer, not work, to every committed time.
#
# Writes the "## mount-write (...)" section of bench/RESULTS.md (replacing
# an older one, leaving every other section alone) and prints it.
#
# Environment knobs (defaults in brackets):
#   BENCH_DIR    work dir: sources, stores, caches, mount points, logs [/tmp/ferry-mount-write-bench]
#   RUNS         repetitions of every measurement [3]
#   CLIENTS      which clients to measure [local ferry rclone]
#   WORKLOADS    which workloads [dd cp untar]
#   BIG_MIB      size of the dd and cp files in MiB [1024]
#   SMALL_FILES  files in the tarball [10000]
#   RCLONE_WRITE_BACK  rclone mount --vfs-write-back [0s]
#   FERRY_MOUNT_ARGS   extra `ferry mount` arguments, e.g. "--max-staging 2G" []
#   COMMIT_MAX   seconds to wait for a commit before calling it failed [900]
#   WAIT_MAX     seconds to wait for other benchmarks (bench/*.sh, wrk) [2400]
#   QUIET_MAX / QUIET_CORES  before each measurement, wait up to QUIET_MAX s
#                for the machine to use < QUIET_CORES cores [120 / 0.3]
#   SKIP_BUILD   1: use the existing target/release/ferry
#   RESULTS      file to update [bench/RESULTS.md]; NO_RESULTS=1 only prints
#
# Needs root (FUSE mounts; apt-get install of rclone and fuse3 when
# missing). Safe to re-run: sources are reused, leftovers of an interrupted
# run are unmounted and stopped, and the trap unmounts everything and stops
# every server and mount this run started.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
WORK=${BENCH_DIR:-/tmp/ferry-mount-write-bench}
RUNS=${RUNS:-3}
CLIENTS=${CLIENTS:-"local ferry rclone"}
WORKLOADS=${WORKLOADS:-"dd cp untar"}
BIG_MIB=${BIG_MIB:-1024}
BIG_SIZE=$((BIG_MIB * 1048576))
SMALL_FILES=${SMALL_FILES:-10000}
RCLONE_WRITE_BACK=${RCLONE_WRITE_BACK:-0s}
FERRY_MOUNT_ARGS=${FERRY_MOUNT_ARGS:-}
COMMIT_MAX=${COMMIT_MAX:-900}
WAIT_MAX=${WAIT_MAX:-2400}
QUIET_MAX=${QUIET_MAX:-120}
QUIET_CORES=${QUIET_CORES:-0.3}
RESULTS=${RESULTS:-$BENCH/RESULTS.md}
SRC=$WORK/src
STORE=$WORK/store
CACHE=$WORK/cache
MNT=$WORK/mnt
LOCAL_DEST=$WORK/local
LOGS=$WORK/logs
OUT=$WORK/results
RAW=$OUT/raw.tsv
PIDFILE=$WORK/pids

log() { printf '[mount-write.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
problem() {
  log "PROBLEM: $*"
  printf '%s\n' "$*" >>"$OUT/problems.txt"
}

[ "$(id -u)" -eq 0 ] || die "run as root (FUSE mounts)"
mkdir -p "$WORK" "$SRC" "$LOGS" "$OUT"
: >"$OUT/problems.txt"

# ---------------------------------------------------------------- 1. tools
need=()
command -v rclone >/dev/null || need+=(rclone)
command -v fusermount3 >/dev/null || need+=(fuse3)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi
command -v python3 >/dev/null || die "python3 is needed (sources and the report)"

# ---------------------------------------------------------------- 2. leftovers
# Only ours: mount points under $MNT, pids in $PIDFILE whose command line
# still names $WORK.
is_mounted() { grep -q " $1 " /proc/self/mountinfo; }
if is_mounted "$MNT"; then
  log "unmounting leftover $MNT"
  fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
fi
if [ -f "$PIDFILE" ]; then
  while read -r p; do
    [ -n "$p" ] && [ -r "/proc/$p/cmdline" ] || continue
    if tr '\0' ' ' <"/proc/$p/cmdline" | grep -qF "$WORK"; then
      log "stopping leftover process $p"
      kill "$p" 2>/dev/null || true
    fi
  done <"$PIDFILE"
fi
: >"$PIDFILE"
: >"$RAW"

# ---------------------------------------------------------------- 3. wait
CLK_TCK=$(getconf CLK_TCK)
busy_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
# CPU ticks of this measurement's own processes: the server, the mount, and
# the children this script has waited for (the command, through `timeout`).
own_ticks() {
  local p sum
  sum=$(awk '{ sub(/^.*\) /, ""); print $14 + $15 }' /proc/$$/stat)
  for p in $SERVER_PID $MOUNT_PID; do
    sum=$((sum + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$sum"
}
others() {
  pgrep -af 'bench/[A-Za-z0-9_.-]+\.sh|(^|/)wrk( |$)' | grep -v 'bench/mount-write' | awk '{ print $1 }' || true
}
waited=0
while [ -n "$(others)" ] && ((waited < WAIT_MAX)); do
  ((waited == 0)) && log "waiting for other benchmarks: $(others | tr '\n' ' ')"
  sleep 20
  waited=$((waited + 20))
done
WAIT_NOTE="no other benchmark (bench/*.sh, wrk) was running when the measurements started"
((waited == 0)) || WAIT_NOTE="$WAIT_NOTE (after waiting ${waited} s for one to finish)"
[ -z "$(others)" ] || WAIT_NOTE="another benchmark was still running when the measurements started (after ${waited} s of waiting)"

# Before each measurement, wait up to QUIET_MAX s for the machine to be
# quiet (every process together using < QUIET_CORES cores over 2 s):
# compiles come and go on this shared machine. What remains is recorded.
quiet_once() {
  local b0 b1
  b0=$(busy_ticks)
  sleep 2
  b1=$(busy_ticks)
  awk -v d=$((b1 - b0)) -v hz="$CLK_TCK" -v lim="$QUIET_CORES" 'BEGIN { exit !(d / hz / 2 < lim) }'
}
NOISY=0
wait_quiet() {
  local start=$SECONDS
  until quiet_once; do
    if ((SECONDS - start >= QUIET_MAX)); then
      log "machine still busy after ${QUIET_MAX}s; measuring anyway"
      NOISY=$((NOISY + 1))
      return
    fi
  done
}

# ---------------------------------------------------------------- 4. build
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "cargo build --release (may wait for the cargo lock)"
  (cd "$ROOT" && cargo build --release --bin ferry) || die "cargo build --release failed"
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[ -x "$TARGET_DIR/release/ferry" ] || die "no $TARGET_DIR/release/ferry"
# Private copy: a concurrent `cargo build` must not swap the binary mid-run.
cp -f "$TARGET_DIR/release/ferry" "$WORK/ferry"
FERRY_BIN=$WORK/ferry
FERRY_REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(cd "$ROOT" && git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ] ||
  FERRY_REV="$FERRY_REV + uncommitted changes"

# ---------------------------------------------------------------- 5. sources
if [ "$(stat -c %s "$SRC/big.bin" 2>/dev/null || echo 0)" != "$BIG_SIZE" ]; then
  log "writing $BIG_MIB MiB of random data to $SRC/big.bin"
  dd if=/dev/urandom of="$SRC/big.bin.tmp" bs=1M count="$BIG_MIB" status=none
  mv "$SRC/big.bin.tmp" "$SRC/big.bin"
fi
if ! [ -s "$SRC/small.tar" ] || [ "$(cat "$SRC/small.count" 2>/dev/null)" != "$SMALL_FILES" ]; then
  log "making a tarball of $SMALL_FILES small files"
  rm -rf "$SRC/tree"
  python3 - "$SRC/tree" "$SMALL_FILES" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(1)
for i in range(n):
    d = os.path.join(root, f"d{i % 100:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}.bin"), "wb") as f:
        f.write(rng.randbytes(rng.randint(100, 16384)))
PY
  tar -cf "$SRC/small.tar" -C "$SRC" tree
  rm -rf "$SRC/tree"
  echo "$SMALL_FILES" >"$SRC/small.count"
fi
SMALL_BYTES=$(tar -tvf "$SRC/small.tar" | awk '$1 ~ /^-/ { s += $3 } END { print s }')
cat "$SRC/big.bin" "$SRC/small.tar" >/dev/null # into the page cache

# ---------------------------------------------------------------- 6. clients
SERVER_PID="" MOUNT_PID="" CLIENT="" DEST=""
remember_pid() { echo "$1" >>"$PIDFILE"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

stop_client() {
  if is_mounted "$MNT"; then
    fusermount3 -u "$MNT" 2>>"$LOGS/unmount.err" || {
      problem "$CLIENT: fusermount3 -u failed ($(tail -n 1 "$LOGS/unmount.err")); lazy unmount"
      umount -l "$MNT" 2>/dev/null || true
    }
  fi
  local p
  for p in $MOUNT_PID $SERVER_PID; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  MOUNT_PID="" SERVER_PID="" CLIENT=""
}

# start_client CLIENT: a fresh server on an empty store, and a fresh mount
# with an empty cache directory. Sets DEST, the directory to write into.
start_client() {
  local c=$1 i
  stop_client
  CLIENT=$c
  rm -rf "$STORE" "$CACHE" "$LOCAL_DEST"
  mkdir -p "$STORE" "$CACHE" "$MNT" "$LOCAL_DEST"
  case $c in
  local)
    DEST=$LOCAL_DEST
    return 0
    ;;
  ferry)
    : >"$LOGS/ferry-serve.out"
    NO_COLOR=1 "$FERRY_BIN" serve --store "$STORE" --listen 127.0.0.1:0 \
      >"$LOGS/ferry-serve.out" 2>>"$LOGS/ferry-serve.err" &
    SERVER_PID=$!
    remember_pid "$SERVER_PID"
    for i in $(seq 100); do
      grep -q '^ferry serving ' "$LOGS/ferry-serve.out" && break
      sleep 0.1
    done
    local url
    url=$(sed -n 's|^ferry serving .* at \(http://[^ ]*\)$|\1|p' "$LOGS/ferry-serve.out" | head -n 1)
    [ -n "$url" ] || die "ferry serve did not start: $(tail -n 5 "$LOGS/ferry-serve.err")"
    # shellcheck disable=SC2086
    NO_COLOR=1 "$FERRY_BIN" mount "$url" "$MNT" --foreground --cache-dir "$CACHE" $FERRY_MOUNT_ARGS \
      >>"$LOGS/ferry-mount.log" 2>&1 &
    ;;
  rclone)
    local port
    port=$(free_port)
    : >"$WORK/rclone.conf"
    rclone serve webdav "$STORE" --config "$WORK/rclone.conf" --addr "127.0.0.1:$port" \
      --log-file "$LOGS/rclone-serve.log" --log-level NOTICE &
    SERVER_PID=$!
    remember_pid "$SERVER_PID"
    for i in $(seq 100); do
      curl -sf -o /dev/null -X PROPFIND -H 'Depth: 0' "http://127.0.0.1:$port/" && break
      sleep 0.1
    done
    rclone mount :webdav: "$MNT" --config "$WORK/rclone.conf" --webdav-url "http://127.0.0.1:$port/" \
      --vfs-cache-mode writes --vfs-write-back "$RCLONE_WRITE_BACK" --cache-dir "$CACHE" \
      --log-file "$LOGS/rclone-mount.log" --log-level NOTICE &
    ;;
  *) die "unknown client $c" ;;
  esac
  MOUNT_PID=$!
  remember_pid "$MOUNT_PID"
  for i in $(seq 300); do
    if is_mounted "$MNT" && stat "$MNT/." >/dev/null 2>&1; then
      DEST=$MNT
      return 0
    fi
    kill -0 "$MOUNT_PID" 2>/dev/null || break
    sleep 0.1
  done
  problem "$c: the mount did not come up"
  return 1
}

# ---------------------------------------------------------------- 7. workloads
now() { echo "${EPOCHREALTIME/./}"; } # µs
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e6 }'; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$RAW"; } # round client workload metric value

# committed WORKLOAD: true once the store holds all of the workload's data.
committed() {
  case $1 in
  dd) [ "$(stat -c %s "$STORE/dd.bin" 2>/dev/null)" = "$BIG_SIZE" ] ;;
  cp) [ "$(stat -c %s "$STORE/big.bin" 2>/dev/null)" = "$BIG_SIZE" ] ;;
  untar)
    [ -d "$STORE/tree" ] || return 1
    # Count and bytes of the tree's files, leaving out names the servers
    # might use for partial files (dot files).
    [ "$(find "$STORE/tree" -type f ! -name '.*' -printf '%s\n' | awk '{ n++; s += $1 } END { print n + 0, s + 0 }')" = "$SMALL_FILES $SMALL_BYTES" ]
    ;;
  esac
}

command_of() { # WORKLOAD DIR
  case $1 in
  dd) echo "dd if=/dev/zero of=$2/dd.bin bs=1M count=$BIG_MIB conv=fsync status=none" ;;
  cp) echo "cp $SRC/big.bin $2/big.bin" ;;
  untar) echo "tar -xf $SRC/small.tar -C $2" ;;
  esac
}

# Checks what arrived (not timed): sizes always, bytes on the first round.
verify() { # ROUND CLIENT WORKLOAD STOREDIR
  local r=$1 c=$2 w=$3 dir=$4
  case $w in
  dd) [ "$r" != 1 ] || cmp -s -n "$BIG_SIZE" /dev/zero "$dir/dd.bin" || problem "$c dd: the stored file is not $BIG_MIB MiB of zeros" ;;
  cp) [ "$r" != 1 ] || cmp -s "$SRC/big.bin" "$dir/big.bin" || problem "$c cp: the stored file differs from the source" ;;
  untar)
    if [ "$r" = 1 ]; then
      local ref=$WORK/tree-ref
      rm -rf "$ref" && mkdir -p "$ref" && tar -xf "$SRC/small.tar" -C "$ref"
      # .ferry-dir: the marker ferry keeps in directories made with mkdir.
      diff -rq -x .ferry-dir "$ref/tree" "$dir/tree" >"$OUT/diff.out" 2>&1 ||
        problem "$c untar: the stored tree differs: $(head -c 300 "$OUT/diff.out" | tr '\n' ' ')"
      rm -rf "$ref"
    fi
    ;;
  esac
}

measure() { # ROUND CLIENT WORKLOAD
  local r=$1 c=$2 w=$3 t0 t1 t2 b0 b1 o0 o1 st=0
  wait_quiet
  start_client "$c" || return 0
  sync
  b0=$(busy_ticks)
  o0=$(own_ticks)
  t0=$(now)
  # shellcheck disable=SC2046
  timeout -k 5 "$COMMIT_MAX" $(command_of "$w" "$DEST") 2>"$OUT/cmd.err" || st=$?
  t1=$(now)
  if ((st != 0)); then
    problem "$c $w: exit status $st: $(head -c 300 "$OUT/cmd.err" | tr '\n' ' ')"
    stop_client
    return 0
  fi
  if [ "$c" = local ]; then
    t2=$t1
  else
    local deadline=$((SECONDS + COMMIT_MAX))
    until committed "$w"; do
      if ((SECONDS > deadline)); then
        problem "$c $w: not committed on the server after $COMMIT_MAX s"
        stop_client
        return 0
      fi
      sleep 0.05
    done
    t2=$(now)
  fi
  b1=$(busy_ticks)
  o1=$(own_ticks)
  record "$r" "$c" "$w" cmd "$(secs "$t0" "$t1")"
  record "$r" "$c" "$w" committed "$(secs "$t0" "$t2")"
  record "$r" "$c" "$w" own_cpu "$(awk -v d=$((o1 - o0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", d / hz }')"
  record "$r" "$c" "$w" others_cores "$(awk -v d=$((b1 - b0 - (o1 - o0))) -v hz="$CLK_TCK" -v t="$(secs "$t0" "$t2")" 'BEGIN { v = d / hz / t; printf "%.2f", v < 0 ? 0 : v }')"
  log "  $c $w: command $(secs "$t0" "$t1") s, committed $(secs "$t0" "$t2") s"
  if [ "$c" = local ]; then verify "$r" "$c" "$w" "$LOCAL_DEST"; else verify "$r" "$c" "$w" "$STORE"; fi
  stop_client
}

# ---------------------------------------------------------------- 8. cleanup
cleanup() {
  local rc=$?
  trap - EXIT
  set +e
  stop_client
  rm -rf "$STORE" "$CACHE" "$LOCAL_DEST" "$WORK/tree-ref"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 9. run
START=$(date -u '+%Y-%m-%d %H:%M UTC')
read -r -a CL <<<"$CLIENTS"
read -r -a WL <<<"$WORKLOADS"
LOADS=()
for r in $(seq "$RUNS"); do
  LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
  order=()
  for i in "${!CL[@]}"; do order+=("${CL[$(((i + r - 1) % ${#CL[@]}))]}"); done
  log "round $r/$RUNS: ${order[*]}"
  for w in "${WL[@]}"; do
    for c in "${order[@]}"; do measure "$r" "$c" "$w"; done
  done
done

# ERROR lines and panics in the clients' and servers' logs are problems.
for f in "$LOGS"/ferry-mount.log "$LOGS"/ferry-serve.err "$LOGS"/rclone-mount.log "$LOGS"/rclone-serve.log; do
  [ -f "$f" ] || continue
  n=$(sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -cE '(^|[ :])ERROR[ :]|panick' || true)
  ((n == 0)) || problem "$(basename "$f") has $n ERROR/panic lines, e.g.: $(sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -E '(^|[ :])ERROR[ :]|panick' | head -n 2 | cut -c1-200 | tr '\n' ' ')"
done

# ---------------------------------------------------------------- 10. report
{
  echo "START=$START"
  echo "RUNS=$RUNS"
  echo "BIG_MIB=$BIG_MIB"
  echo "SMALL_FILES=$SMALL_FILES"
  echo "SMALL_BYTES=$SMALL_BYTES"
  echo "FERRY_REV=$FERRY_REV"
  echo "FERRY_MOUNT_ARGS=$FERRY_MOUNT_ARGS"
  echo "RCLONE=$(rclone version 2>/dev/null | head -n 1)"
  echo "RCLONE_WRITE_BACK=$RCLONE_WRITE_BACK"
  echo "KERNEL=$(uname -r)"
  echo "CPU=$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
  echo "MEM=$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "FS=$(df -T "$WORK" | awk 'NR == 2 { print $2 " on " $1 }')"
  echo "LOADS=$(IFS=';'; echo "${LOADS[*]}")"
  echo "WAIT_NOTE=$WAIT_NOTE"
  echo "QUIET=$QUIET_CORES cores, up to $QUIET_MAX s; measured anyway after that $NOISY times"
} >"$OUT/meta.env"

python3 "$BENCH/mount-write-report.py" "$RAW" "$OUT/meta.env" "$OUT/problems.txt" >"$OUT/section.md"
cat "$OUT/section.md"
if [ "${NO_RESULTS:-0}" != 1 ]; then
  python3 "$BENCH/mount-write-report.py" --splice "$RESULTS" "$OUT/section.md"
  log "wrote the mount-write section of $RESULTS; raw figures in $RAW, logs in $LOGS"
fi
