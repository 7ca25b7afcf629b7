#!/usr/bin/env bash
# bench/mount-read.sh: reading through `ferry mount` against `rclone mount`
# (vfs-cache-mode off and full), `httpdirfs` and the local disk.
#
# One directory holds a 1 GiB random file and a 120 s H.264 MP4 with its moov
# atom at the end. It is served on loopback by
#   * `ferry serve`            -> `ferry mount --cache-size CACHE_SIZE`
#   * `rclone serve http`      -> `rclone mount :http:` (vfs-cache-mode off, full)
#   * nginx with autoindex     -> `httpdirfs` (it needs an HTML index)
# and read directly from the local disk as the reference.
#
# Measured for every client, each RUNS times (medians quoted):
#   * cold sequential read of the 1 GiB file: fio rw=read bs=1M psync;
#   * warm re-read: the same fio job again at once on the same mount;
#   * random 64 KiB reads at queue depth 1: fio randread psync, RAND_IOS reads
#     over the whole 1 GiB file, clat p50 / p99 (cold), then the same offsets
#     again (warm);
#   * ffprobe of the MP4 (cold, then warm);
#   * `ffmpeg -ss 60 -i FILE -frames:v 1 -f null -` (cold, then warm);
#   * the FUSE process's peak RSS (VmHWM) in each of those sessions;
#   * how many bytes the server read (its rchar) during the cold sequential
#     and the cold random run;
#   * sequential and random again on a fresh mount but with the server's page
#     cache warm (the client's own cost, without the disk).
# "Cold" means: the FUSE client is unmounted and mounted again (its own memory
# and disk caches emptied), then `sync; echo 3 > /proc/sys/vm/drop_caches`
# just before the measurement (after which the tools themselves are read
# back in on a small clip outside the served directory). fio runs with
# --direct=0 everywhere (buffered reads; not every FUSE client supports
# O_DIRECT). Also, per round: random Range GETs straight to ferry serve and
# nginx (bench/mount-read-ranges.py), to tell server time from mount time.
#
# Writes the "## mount-read (...)" section of bench/RESULTS.md (replacing an
# older one, leaving every other section alone) and prints it.
#
# Environment knobs (defaults in brackets):
#   BENCH_DIR    work dir: data, mount points, logs, raw results [/tmp/ferry-mount-bench]
#   RUNS         repetitions of every measurement [3]
#   CACHE_SIZE   ferry mount --cache-size [256M]
#   RAND_IOS     random 64 KiB reads per fio random run [1000]
#   RAND_MAX_S   ... or fewer if they take longer than this many seconds [60]
#   SEQ_MAX_S    a sequential fio run stops after this many seconds [120]
#                (httpdirfs without --cache reads ~1.3 MB/s here: ~100 ms per
#                128 KiB request, so it never reads the whole GiB in time)
#   CHECK_SLOW_MIB  MiB of big.bin compared through httpdirfs, from the start [128]
#   RANGE_REQS   requests per server-reference run [200]
#   CLIENTS      which clients to measure [local ferry rclone-off rclone-full httpdirfs]
#   FERRY_REF    commit to export (git archive) and build under BENCH_DIR [HEAD];
#                "worktree" builds the working tree in place instead
#   SKIP_BUILD   1: use the binary already built
#   WAIT_MAX     seconds to wait for other benchmarks to finish [2400]
#   RESULTS      file to update [bench/RESULTS.md]; NO_RESULTS=1 only prints
#   For trying the script out only (the section then says so):
#   BIG_MIB      size of the random file in MiB [1024]
#   DROP_CACHES  0: do not drop the page cache (cold runs are then not cold) [1]
#
# Needs root (drop_caches, FUSE mounts, apt-get install of rclone, httpdirfs,
# fio, ffmpeg, nginx-light and jq when missing). Safe to re-run: data files are
# reused, leftovers of an interrupted run are unmounted and stopped, and the
# trap unmounts everything and stops every server and mount this run started.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
WORK=${BENCH_DIR:-/tmp/ferry-mount-bench}
RUNS=${RUNS:-3}
CACHE_SIZE=${CACHE_SIZE:-256M}
RAND_IOS=${RAND_IOS:-1000}
RAND_MAX_S=${RAND_MAX_S:-60}
SEQ_MAX_S=${SEQ_MAX_S:-120}
CHECK_SLOW_MIB=${CHECK_SLOW_MIB:-128}
RANGE_REQS=${RANGE_REQS:-200}
CLIENTS=${CLIENTS:-"local ferry rclone-off rclone-full httpdirfs"}
FERRY_REF=${FERRY_REF:-HEAD}
WAIT_MAX=${WAIT_MAX:-2400}
RESULTS=${RESULTS:-$BENCH/RESULTS.md}
DATA=$WORK/data
MNT=$WORK/mnt
LOGS=$WORK/logs
OUT=$WORK/results
RAW=$OUT/raw.tsv
META=$OUT/meta.env
PIDFILE=$WORK/pids
BIG=big.bin
BIG_MIB=${BIG_MIB:-1024}
BIG_SIZE=$((BIG_MIB * 1024 * 1024))
DROP_CACHES=${DROP_CACHES:-1}
VIDEO=video.mp4
OTHER_BENCH=${OTHER_BENCH:-'bench/serve.sh|bench/upload.sh|bench/ws.sh|wrk'}

log() { printf '[mount-read.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
PROBLEMS=()
problem() {
  log "PROBLEM: $*"
  PROBLEMS+=("$*")
  printf '%s\n' "$*" >>"$OUT/problems.txt"
}

[ "$(id -u)" -eq 0 ] || die "run as root (drop_caches and FUSE mounts)"

# ---------------------------------------------------------------- 0. wait
# Before anything else, wait while any other benchmark runs (pgrep of
# OTHER_BENCH, every 20 s, at most WAIT_MAX s). Other helpers' scripts wait
# while any bench/*.sh runs; to not make them wait for us while we only wait,
# this first wait runs under a neutral process name (bash -c '. SCRIPT'
# ferry-mount-read-waiting), and the script then starts again under its own.
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
others_all() { pgrep -af "$OTHER_BENCH" | grep -v "^$$ " || true; }
case ${MOUNT_READ_PHASE:-start} in
start)
  if [ -n "$(others_all)" ]; then
    log "other benchmarks running: $(others_all | cut -c1-70 | tr '\n' ';'); waiting (as ferry-mount-read-waiting)"
    exec env MOUNT_READ_PHASE=wait MOUNT_READ_SELF="$SELF" bash -c '. "$MOUNT_READ_SELF"' ferry-mount-read-waiting
  fi
  ;;
wait)
  waited=0 overlap=""
  while o=$(others_all) && [ -n "$o" ]; do
    if ((waited >= WAIT_MAX)); then
      overlap="another benchmark still running after ${WAIT_MAX}s of waiting; started anyway: $(echo "$o" | cut -c1-70 | tr '\n' ';')"
      break
    fi
    sleep 20
    waited=$((waited + 20))
  done
  log "waited ${waited}s for other benchmarks"
  exec env MOUNT_READ_PHASE=measure MOUNT_READ_INITIAL_OVERLAP="$overlap" bash "$SELF"
  ;;
esac

# ---------------------------------------------------------------- 1. tools
need=()
command -v rclone >/dev/null || need+=(rclone)
command -v httpdirfs >/dev/null || need+=(httpdirfs)
command -v fio >/dev/null || need+=(fio)
command -v ffmpeg >/dev/null || need+=(ffmpeg)
command -v jq >/dev/null || need+=(jq)
command -v curl >/dev/null || need+=(curl)
command -v fusermount3 >/dev/null || need+=(fuse3)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need+=(nginx-light)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
command -v python3 >/dev/null || die "python3 is needed (report and byte checks)"

mkdir -p "$WORK" "$DATA" "$MNT" "$LOGS" "$OUT"

# ---------------------------------------------------------------- 2. leftovers
# A previous run that was killed hard may have left mounts and processes.
# Only ours: mount points under $MNT, pids recorded in $PIDFILE whose command
# line still names $WORK.
for m in "$MNT"/*; do
  [ -d "$m" ] || continue
  if grep -q " $m " /proc/self/mountinfo; then
    log "unmounting leftover $m"
    fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  fi
done
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
: >"$OUT/problems.txt"

# Waits while another benchmark is active (its load would skew ours and our
# drop_caches would skew theirs), checking every 20 s, at most WAIT_MAX s.
# "Active" = running anything besides its own wait loop: other scripts wait
# while any bench/*.sh runs, and two scripts waiting for each other would
# otherwise both wait WAIT_MAX and then measure together.
OVERLAPS=()
[ -z "${MOUNT_READ_INITIAL_OVERLAP:-}" ] || {
  problem "$MOUNT_READ_INITIAL_OVERLAP"
  OVERLAPS+=("the start")
}
# 0 (true) if a descendant of $1 runs something other than a wait loop.
busy_below() {
  local k
  for k in $(pgrep -P "$1" 2>/dev/null); do
    case $(cat "/proc/$k/comm" 2>/dev/null) in
    sleep | pgrep | grep | awk | tr | cut | sed | cat | date | ps | '') ;;
    bash | sh) busy_below "$k" && return 0 ;;
    *) return 0 ;;
    esac
  done
  return 1
}
others_active() {
  local pid
  for pid in $(pgrep -f "$OTHER_BENCH" || true); do
    [ "$pid" != $$ ] || continue
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = wrk ] || busy_below "$pid"; then
      echo "$pid $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-70)"
    fi
  done
}
wait_quiet() {
  local waited=0 others
  while others=$(others_active) && [ -n "$others" ]; do
    if ((waited >= WAIT_MAX)); then
      problem "another benchmark still active after ${WAIT_MAX}s of waiting; measured anyway ($1): $(echo "$others" | tr '\n' ';')"
      OVERLAPS+=("$1")
      return 0
    fi
    ((waited == 0)) && log "waiting for other benchmarks to finish: $(echo "$others" | tr '\n' ';')"
    sleep 20
    waited=$((waited + 20))
  done
  ((waited == 0)) || log "other benchmarks done after ${waited}s"
}

# ---------------------------------------------------------------- 3. build
if [ "$FERRY_REF" = worktree ]; then
  TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release in $ROOT (may wait for the cargo lock)"
    (cd "$ROOT" && cargo build --release --bin ferry) || die "cargo build --release failed"
  fi
  FERRY_REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(cd "$ROOT" && git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    FERRY_REV="$FERRY_REV + uncommitted changes in the working tree"
  fi
else
  # A committed revision, exported and built apart from the working tree,
  # which may hold someone's unfinished edits. Always the same directory
  # (so the dependencies stay built), re-exported when the revision changes,
  # with fresh mtimes (tar -m) so that cargo does rebuild ferry: git archive
  # stamps every file with the commit time, which may be older than the last
  # build.
  FERRY_REV=$(cd "$ROOT" && git rev-parse --short "$FERRY_REF^{commit}") || die "unknown FERRY_REF $FERRY_REF"
  SRC_DIR=$WORK/src
  if [ "$(cat "$SRC_DIR/.mount-read-bench.rev" 2>/dev/null)" != "$FERRY_REV" ]; then
    rm -rf "$SRC_DIR"
    mkdir -p "$SRC_DIR"
    (cd "$ROOT" && git archive "$FERRY_REV") | tar -x -m -C "$SRC_DIR"
    echo "$FERRY_REV" >"$SRC_DIR/.mount-read-bench.rev"
  fi
  TARGET_DIR=${CARGO_TARGET_DIR:-$WORK/target}
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release of $FERRY_REV in $SRC_DIR"
    (cd "$SRC_DIR" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --bin ferry) || die "cargo build --release failed"
    echo "$FERRY_REV" >"$TARGET_DIR/mount-read-bench.rev"
  else
    # The binary there may come from another revision than FERRY_REF now names.
    FERRY_REV="$(cat "$TARGET_DIR/mount-read-bench.rev" 2>/dev/null || echo "unknown revision") (SKIP_BUILD)"
  fi
fi
[ -x "$TARGET_DIR/release/ferry" ] || die "no $TARGET_DIR/release/ferry"
# Private copy: a concurrent `cargo build` must not swap the binary mid-run.
cp -f "$TARGET_DIR/release/ferry" "$WORK/ferry"
FERRY_BIN=$WORK/ferry
FERRY_BUILT=$(date -u -r "$TARGET_DIR/release/ferry" '+%Y-%m-%d %H:%M:%S UTC')

# ---------------------------------------------------------------- 4. data
need_data=0
[ "$(stat -c %s "$DATA/$BIG" 2>/dev/null || echo 0)" = "$BIG_SIZE" ] && [ -s "$DATA/$VIDEO" ] || need_data=1
((need_data == 0)) || wait_quiet "data preparation"
# Only the two test files live in the served directory.
find "$DATA" -mindepth 1 -maxdepth 1 ! -name "$BIG" ! -name "$VIDEO" -exec rm -rf {} +
if [ "$(stat -c %s "$DATA/$BIG" 2>/dev/null || echo 0)" != "$BIG_SIZE" ]; then
  log "writing $BIG_MIB MiB of random data to $DATA/$BIG"
  nice -n 10 dd if=/dev/urandom of="$WORK/$BIG.tmp" bs=1M count="$BIG_MIB" status=none
  mv "$WORK/$BIG.tmp" "$DATA/$BIG"
fi

# Top-level MP4 boxes in file order, e.g. "ftyp free mdat moov".
mp4_boxes() {
  python3 - "$1" <<'PY'
import struct, sys
f = open(sys.argv[1], "rb")
size = f.seek(0, 2)
pos, names = 0, []
while pos < size:
    f.seek(pos)
    hdr = f.read(16)
    n, kind = struct.unpack(">I4s", hdr[:8])
    if n == 1:
        n = struct.unpack(">Q", hdr[8:16])[0]
    elif n == 0:
        n = size - pos
    names.append(kind.decode("latin-1"))
    if n < 8:
        break
    pos += n
print(" ".join(names))
PY
}
video_ok() {
  [ -s "$DATA/$VIDEO" ] || return 1
  local boxes
  boxes=$(mp4_boxes "$DATA/$VIDEO") || return 1
  [[ " $boxes " == *" mdat "*"moov " ]] || return 1 # moov after mdat, last
  local d
  d=$(ffprobe -v error -show_entries format=duration -of csv=p=0 "$DATA/$VIDEO") || return 1
  awk -v d="$d" 'BEGIN { exit !(d > 119 && d < 121) }'
}
if ! video_ok; then
  log "encoding the 120 s H.264 test video (moov at the end: no +faststart)"
  nice -n 10 ffmpeg -nostdin -y -v error -f lavfi -i testsrc=duration=120:size=1280x720:rate=25 \
    -c:v libx264 -preset veryfast -pix_fmt yuv420p "$WORK/$VIDEO.tmp.mp4"
  mv "$WORK/$VIDEO.tmp.mp4" "$DATA/$VIDEO"
  video_ok || die "the encoded video does not have mdat before moov, or is not 120 s long"
fi
# A 1 s clip of the same kind, outside the served directory, to read the
# tools back into memory after each drop_caches.
WARM_CLIP=$WORK/warm-clip.mp4
if ! [ -s "$WARM_CLIP" ]; then
  ffmpeg -nostdin -y -v error -f lavfi -i testsrc=duration=1:size=1280x720:rate=25 \
    -c:v libx264 -preset veryfast -pix_fmt yuv420p "$WARM_CLIP.tmp.mp4"
  mv "$WARM_CLIP.tmp.mp4" "$WARM_CLIP"
fi
VIDEO_SIZE=$(stat -c %s "$DATA/$VIDEO")
VIDEO_BOXES=$(mp4_boxes "$DATA/$VIDEO")
log "data: $BIG $BIG_SIZE bytes; $VIDEO $VIDEO_SIZE bytes, boxes: $VIDEO_BOXES"

# ---------------------------------------------------------------- 5. servers
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
remember_pid() { echo "$1" >>"$PIDFILE"; }

SERVER_PIDS=()
FERRY_URL="" RCLONE_URL="" NGINX_URL=""

wait_http() { # URL PID NAME LOG
  local i
  for i in $(seq 300); do
    curl -sf -o /dev/null "$1" && return 0
    kill -0 "$2" 2>/dev/null || die "$3 exited at start: $(tail -n 5 "$4")"
    sleep 0.1
  done
  die "$3 did not answer on $1"
}

start_servers() {
  # ferry
  : >"$LOGS/ferry-serve.out"
  NO_COLOR=1 "$FERRY_BIN" serve --store "$DATA" --listen 127.0.0.1:0 \
    >"$LOGS/ferry-serve.out" 2>>"$LOGS/ferry-serve.err" &
  FERRY_SERVE_PID=$!
  SERVER_PIDS+=("$FERRY_SERVE_PID")
  remember_pid "$FERRY_SERVE_PID"
  local i
  for i in $(seq 300); do
    grep -q '^ferry serving ' "$LOGS/ferry-serve.out" && break
    kill -0 "$FERRY_SERVE_PID" 2>/dev/null || die "ferry serve exited at start: $(tail -n 5 "$LOGS/ferry-serve.err")"
    sleep 0.1
  done
  FERRY_URL=$(sed -n 's|^ferry serving .* at \(http://[^ ]*\)$|\1|p' "$LOGS/ferry-serve.out" | head -n 1)
  [ -n "$FERRY_URL" ] || die "ferry serve did not print 'ferry serving ... at http://ADDR'"

  # rclone serve http
  local port
  port=$(free_port)
  : >"$WORK/rclone.conf"
  rclone serve http "$DATA" --config "$WORK/rclone.conf" --addr "127.0.0.1:$port" --read-only \
    --log-file "$LOGS/rclone-serve.log" --log-level NOTICE &
  RCLONE_SERVE_PID=$!
  SERVER_PIDS+=("$RCLONE_SERVE_PID")
  remember_pid "$RCLONE_SERVE_PID"
  RCLONE_URL="http://127.0.0.1:$port/"
  wait_http "$RCLONE_URL$BIG" "$RCLONE_SERVE_PID" "rclone serve http" "$LOGS/rclone-serve.log"

  # nginx with autoindex, for httpdirfs
  port=$(free_port)
  local ngx=$WORK/nginx
  mkdir -p "$ngx/tmp"
  local temp_paths="client_body_temp_path $ngx/tmp/body;" m nginx_v
  nginx_v=$("$NGINX_BIN" -V 2>&1)
  for m in proxy fastcgi uwsgi scgi; do
    [[ $nginx_v == *"--without-http_${m}_module"* ]] || temp_paths="$temp_paths ${m}_temp_path $ngx/tmp/$m;"
  done
  cat >"$ngx/nginx.conf" <<EOF
# Written by bench/mount-read.sh: the directory ferry serves, with an index
# page for httpdirfs.
daemon off;
master_process on;
user root;
worker_processes 1;
pid $ngx/nginx.pid;
error_log $ngx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    $temp_paths
    server {
        listen 127.0.0.1:$port;
        root $DATA;
        location / { autoindex on; }
    }
}
EOF
  "$NGINX_BIN" -t -q -e "$ngx/error.log" -p "$ngx" -c "$ngx/nginx.conf" || die "nginx -t failed, see $ngx/error.log"
  "$NGINX_BIN" -e "$ngx/error.log" -p "$ngx" -c "$ngx/nginx.conf" &
  NGINX_PID=$!
  SERVER_PIDS+=("$NGINX_PID")
  remember_pid "$NGINX_PID"
  NGINX_URL="http://127.0.0.1:$port/"
  wait_http "$NGINX_URL" "$NGINX_PID" nginx "$ngx/error.log"
  curl -sf -o /dev/null -D "$LOGS/nginx-range.txt" -r 100-199 "$NGINX_URL$BIG" &&
    grep -qi '^Content-Range: bytes 100-199/' "$LOGS/nginx-range.txt" || die "nginx did not answer a Range request with 206"
  log "servers: ferry $FERRY_URL, rclone serve http $RCLONE_URL, nginx $NGINX_URL"
}

servers_alive() {
  local p ok=0
  for p in "${SERVER_PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null || {
      problem "server process $p ($(cat "/proc/$p/comm" 2>/dev/null || echo gone)) died"
      ok=1
    }
  done
  return $ok
}

# ---------------------------------------------------------------- 6. clients
MOUNT_PID=""     # the FUSE process of the client currently mounted
MOUNT_CLIENT=""  # which client that is

is_mounted() { grep -q " $1 " /proc/self/mountinfo; }

# Aborts the FUSE connection behind mount point $1 (for a hung client).
abort_fuse() {
  local dev
  dev=$(awk -v m="$1" '$5 == m { print $3 }' /proc/self/mountinfo | head -n 1)
  [ -n "$dev" ] || return 0
  local minor=${dev#*:}
  [ -w "/sys/fs/fuse/connections/$minor/abort" ] && echo 1 >"/sys/fs/fuse/connections/$minor/abort" || true
}

unmount_client() {
  [ -n "$MOUNT_CLIENT" ] || return 0
  local mp=$MNT/$MOUNT_CLIENT pid=$MOUNT_PID
  if is_mounted "$mp"; then
    if ! fusermount3 -u "$mp" 2>>"$LOGS/unmount.err"; then
      problem "$MOUNT_CLIENT: fusermount3 -u $mp failed ($(tail -n 1 "$LOGS/unmount.err")); aborting the FUSE connection"
      abort_fuse "$mp"
      umount -l "$mp" 2>/dev/null || true
    fi
  fi
  if [ -n "$pid" ]; then
    local i
    for i in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      problem "$MOUNT_CLIENT: FUSE process $pid still running 10 s after unmount; SIGTERM"
      kill "$pid" 2>/dev/null || true
      sleep 2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    local st=0
    wait "$pid" 2>/dev/null || st=$?
    if ((st > 128)) && ((st != 143)); then
      problem "$MOUNT_CLIENT: FUSE process $pid ended by signal $((st - 128)) (SIG$(kill -l $((st - 128)) 2>/dev/null || echo '?'))"
    fi
  fi
  MOUNT_PID="" MOUNT_CLIENT=""
}

# mount_client CLIENT: a fresh mount with empty client caches.
mount_client() {
  local c=$1 mp=$MNT/$1 lg=$LOGS/$1.log
  unmount_client
  mkdir -p "$mp"
  is_mounted "$mp" && die "$mp is still mounted"
  echo "=== $(date +%T) mount" >>"$lg"
  case $c in
  ferry)
    NO_COLOR=1 "$FERRY_BIN" mount "$FERRY_URL" "$mp" --cache-size "$CACHE_SIZE" --foreground >>"$lg" 2>&1 &
    ;;
  rclone-off | rclone-full)
    local mode=${c#rclone-}
    rm -rf "$WORK/rclone-cache-$mode"
    rclone mount :http: "$mp" --config "$WORK/rclone.conf" --http-url "$RCLONE_URL" --read-only \
      --vfs-cache-mode "$mode" --cache-dir "$WORK/rclone-cache-$mode" \
      --log-file "$lg" --log-level NOTICE &
    ;;
  httpdirfs)
    rm -rf "$WORK/httpdirfs-xdg"
    # --no-range-check: httpdirfs 1.2.5 looks for "Accept-Ranges: bytes" in
    # the 206 answer, which nginx sends only on 200s, and exits. nginx does
    # serve ranges (checked in start_servers).
    XDG_CACHE_HOME=$WORK/httpdirfs-xdg httpdirfs -f --no-range-check "$NGINX_URL" "$mp" >>"$lg" 2>&1 &
    ;;
  *) die "unknown client $c" ;;
  esac
  MOUNT_PID=$!
  MOUNT_CLIENT=$c
  remember_pid "$MOUNT_PID"
  local i
  for i in $(seq 300); do
    if is_mounted "$mp" && [ "$(stat -c %s "$mp/$BIG" 2>/dev/null)" = "$BIG_SIZE" ] &&
      [ "$(stat -c %s "$mp/$VIDEO" 2>/dev/null)" = "$VIDEO_SIZE" ]; then
      return 0
    fi
    if ! kill -0 "$MOUNT_PID" 2>/dev/null; then
      problem "$c: mount process exited: $(tail -n 5 "$lg" | tr '\n' ' ')"
      unmount_client
      return 1
    fi
    sleep 0.1
  done
  problem "$c: $mp not mounted with the right file sizes after 30 s: $(tail -n 5 "$lg" | tr '\n' ' ')"
  unmount_client
  return 1
}

# path CLIENT FILE
path_of() { if [ "$1" = local ]; then echo "$DATA/$2"; else echo "$MNT/$1/$2"; fi; }

# Drops the page cache, dentries and inodes, then reads the measuring tools
# back in (fio, ffprobe and ffmpeg with the H.264 decoder, on a 1 s clip
# outside the served directory), so that a cold figure is about the data
# and not about loading libavcodec from disk.
drop_caches() {
  [ "$DROP_CACHES" = 1 ] || return 0
  sync
  echo 3 >/proc/sys/vm/drop_caches
  fio --name=warm --filename="$WARM_CLIP" --readonly --rw=read --bs=4k --ioengine=psync --output=/dev/null >/dev/null 2>&1 || true
  ffprobe -v error -show_format -show_streams "$WARM_CLIP" >/dev/null 2>&1 || true
  ffmpeg -nostdin -v error -ss 0.5 -i "$WARM_CLIP" -frames:v 1 -f null - >/dev/null 2>&1 || true
}

# prepare_cold CLIENT: fresh mount (not for local), then drop every cache.
prepare_cold() {
  if [ "$1" = local ]; then unmount_client; else mount_client "$1" || return 1; fi
  drop_caches
  sleep 0.5
}

# kB of a /proc/PID/status field.
proc_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
# CPU seconds (user + system) the process has used.
CLK_TCK=$(getconf CLK_TCK)
proc_cpu() { awk -v t="$CLK_TCK" '{ sub(/^.*\) /, ""); printf "%.3f\n", ($12 + $13) / t }' "/proc/$1/stat" 2>/dev/null || echo ""; }

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"; } # round client metric value
record_hwm() { # round client metric
  [ -n "$MOUNT_PID" ] || return 0
  local kb
  kb=$(proc_kb "$MOUNT_PID" VmHWM)
  [ -n "$kb" ] && record "$1" "$2" "$3" "$(awk -v k="$kb" 'BEGIN { printf "%.1f", k / 1024 }')"
}

# run_timed LABEL TIMEOUT CMD...: runs CMD, prints wall ms; fails on error/timeout.
run_timed() {
  local label=$1 t=$2
  shift 2
  local t0 t1 st=0
  t0=${EPOCHREALTIME/./}
  timeout -k 5 "$t" "$@" >"$OUT/last.out" 2>"$OUT/last.err" || st=$?
  t1=${EPOCHREALTIME/./}
  if ((st != 0)); then
    if ((st == 124 || st == 137)); then
      problem "$label: timed out after $t s"
    else
      problem "$label: exit status $st: $(head -c 300 "$OUT/last.err" | tr '\n' ' ')"
    fi
    return 1
  fi
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", (b - a) / 1000 }'
}

FIO_COMMON=(--readonly --direct=0 --ioengine=psync --iodepth=1 --output-format=json)

# fio_seq CLIENT INVALIDATE -> "MB/s MiB_read". fio stops after SEQ_MAX_S
# seconds (only a very slow client gets there); MB/s is over what it read.
fio_seq() {
  local f
  f=$(path_of "$1" "$BIG")
  run_timed "$1 fio seq (invalidate=$2)" $((SEQ_MAX_S + 300)) fio --name=seq --filename="$f" --rw=read --bs=1M \
    --size="$BIG_SIZE" --runtime="$SEQ_MAX_S" --invalidate="$2" "${FIO_COMMON[@]}" --output="$OUT/fio.json" >/dev/null || return 1
  local bw n ms
  bw=$(jq -r '.jobs[0].read.bw_bytes' "$OUT/fio.json")
  n=$(jq -r '.jobs[0].read.io_bytes' "$OUT/fio.json")
  ms=$(jq -r '.jobs[0].read.runtime' "$OUT/fio.json")
  if [ "$n" != "$BIG_SIZE" ] && ((ms < SEQ_MAX_S * 1000 - 1000)); then
    problem "$1 fio seq read $n bytes, not $BIG_SIZE, in $ms ms"
    return 1
  fi
  awk -v b="$bw" -v n="$n" 'BEGIN { printf "%.1f %.0f\n", b / 1e6, n / 1048576 }'
}

# fio_rand CLIENT INVALIDATE -> "p50_us p99_us mean_us reads". At most
# RAND_IOS reads or RAND_MAX_S seconds, whichever comes first.
fio_rand() {
  local f
  f=$(path_of "$1" "$BIG")
  run_timed "$1 fio randread (invalidate=$2)" $((RAND_MAX_S + 300)) fio --name=rand --filename="$f" --rw=randread --bs=64k \
    --size="$BIG_SIZE" --number_ios="$RAND_IOS" --runtime="$RAND_MAX_S" --randrepeat=1 --invalidate="$2" \
    --percentile_list=50:99 "${FIO_COMMON[@]}" --output="$OUT/fio.json" >/dev/null || return 1
  local n
  n=$(jq -r '.jobs[0].read.total_ios' "$OUT/fio.json")
  ((n > 0)) || {
    problem "$1 fio randread did no reads"
    return 1
  }
  jq -r '.jobs[0].read.clat_ns | "\(.percentile["50.000000"] / 1000) \(.percentile["99.000000"] / 1000) \(.mean / 1000)"' "$OUT/fio.json" |
    sed "s/\$/ $n/"
}

probe() { # CLIENT -> ms
  local f ms
  f=$(path_of "$1" "$VIDEO")
  ms=$(run_timed "$1 ffprobe" 120 ffprobe -v error -show_format -show_streams "$f") || return 1
  grep -q '^duration=1[12][0-9]\.' "$OUT/last.out" || {
    problem "$1 ffprobe: no ~120 s duration in its output"
    return 1
  }
  echo "$ms"
}

seek_decode() { # CLIENT -> ms
  local f
  f=$(path_of "$1" "$VIDEO")
  run_timed "$1 ffmpeg seek+decode" 120 ffmpeg -nostdin -v error -ss 60 -i "$f" -frames:v 1 -f null -
}

# Bytes the server behind CLIENT has read so far (rchar of /proc/PID/io, the
# process and its children: nginx's workers; sendfile counts too).
server_pid_of() {
  case $1 in
  ferry) echo "$FERRY_SERVE_PID" ;;
  rclone-off | rclone-full) echo "$RCLONE_SERVE_PID" ;;
  httpdirfs) echo "$NGINX_PID" ;;
  esac
}
server_rchar() {
  local top p sum=0 v
  top=$(server_pid_of "$1")
  [ -n "$top" ] || return 0
  for p in "$top" $(pgrep -P "$top" 2>/dev/null); do
    v=$(awk '$1 == "rchar:" { print $2 }' "/proc/$p/io" 2>/dev/null || true)
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}
# record_served ROUND CLIENT METRIC BEFORE: MiB the server read since BEFORE.
record_served() {
  [ -n "$4" ] || return 0
  local now
  now=$(server_rchar "$2")
  [ -n "$now" ] && record "$1" "$2" "$3" "$(awk -v a="$4" -v b="$now" 'BEGIN { printf "%.1f", (b - a) / 1048576 }')"
}

# prepare_hot CLIENT: a fresh mount (client caches empty) while the server's
# page cache holds the whole file: what the client itself costs, without
# the disk.
prepare_hot() {
  mount_client "$1" || return 1
  cat "$DATA/$BIG" >/dev/null
  sleep 0.5
}

# ---------------------------------------------------------------- 7. sessions
s_seq() { # ROUND CLIENT
  local r=$1 c=$2 v cpu0="" cpu1
  prepare_cold "$c" || return 0
  [ -z "$MOUNT_PID" ] || cpu0=$(proc_cpu "$MOUNT_PID")
  local rc0
  rc0=$(server_rchar "$c")
  if v=$(fio_seq "$c" 1); then
    record "$r" "$c" seq_cold "${v% *}"
    record "$r" "$c" seq_cold_mib "${v#* }"
  fi
  record_served "$r" "$c" seq_cold_served "$rc0"
  if [ -n "$cpu0" ]; then
    cpu1=$(proc_cpu "$MOUNT_PID")
    [ -n "$cpu1" ] && record "$r" "$c" seq_cold_cpu "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.2f", b - a }')"
  fi
  if v=$(fio_seq "$c" 0); then
    record "$r" "$c" seq_warm "${v% *}"
    record "$r" "$c" seq_warm_mib "${v#* }"
  fi
  record_hwm "$r" "$c" hwm_seq
  unmount_client
}

s_rand() {
  local r=$1 c=$2 v
  prepare_cold "$c" || return 0
  local rc0
  rc0=$(server_rchar "$c")
  if v=$(fio_rand "$c" 1); then
    read -r p50 p99 mean n <<<"$v"
    record "$r" "$c" rand_p50 "$p50"
    record "$r" "$c" rand_p99 "$p99"
    record "$r" "$c" rand_mean "$mean"
    record "$r" "$c" rand_n "$n"
  fi
  record_served "$r" "$c" rand_served "$rc0"
  if v=$(fio_rand "$c" 0); then
    read -r p50 p99 mean n <<<"$v"
    record "$r" "$c" rand_warm_p50 "$p50"
    record "$r" "$c" rand_warm_p99 "$p99"
    record "$r" "$c" rand_warm_n "$n"
  fi
  record_hwm "$r" "$c" hwm_rand
  unmount_client
}

s_video() {
  local r=$1 c=$2 v
  prepare_cold "$c" || return 0
  v=$(probe "$c") && record "$r" "$c" probe_cold "$v"
  v=$(probe "$c") && record "$r" "$c" probe_warm "$v"
  record_hwm "$r" "$c" hwm_probe
  prepare_cold "$c" || return 0
  v=$(seek_decode "$c") && record "$r" "$c" seek_cold "$v"
  v=$(seek_decode "$c") && record "$r" "$c" seek_warm "$v"
  record_hwm "$r" "$c" hwm_seek
  unmount_client
}

# Fresh mount, server's page cache warm (not for local, whose equivalent is
# the warm re-read, nor httpdirfs, which is bound by its ~100 ms a request).
s_hot() {
  local r=$1 c=$2 v
  case $c in local | httpdirfs) return 0 ;; esac
  prepare_hot "$c" || return 0
  if v=$(fio_seq "$c" 1); then
    record "$r" "$c" seq_hot "${v% *}"
  fi
  record_hwm "$r" "$c" hwm_hot_seq
  prepare_hot "$c" || return 0
  if v=$(fio_rand "$c" 1); then
    read -r p50 p99 mean n <<<"$v"
    record "$r" "$c" rand_hot_p50 "$p50"
    record "$r" "$c" rand_hot_p99 "$p99"
  fi
  record_hwm "$r" "$c" hwm_hot_rand
  unmount_client
}

# Reference without FUSE: random Range GETs straight to ferry serve and to
# nginx (keep-alive, one at a time), 64 KiB and 1 MiB, after dropping the page
# cache and then again on the same offsets (server-side page cache warm).
s_ranges() {
  local r=$1 srv url len v
  unmount_client
  for srv in ferry-serve nginx; do
    case $srv in
    ferry-serve) url=$FERRY_URL/v1/files/$BIG ;;
    nginx) url=$NGINX_URL$BIG ;;
    esac
    for len in 65536 1048576; do
      local tag=$((len / 1024))k
      drop_caches
      if v=$(timeout 300 python3 "$BENCH/mount-read-ranges.py" "$url" "$BIG_SIZE" "$len" "$RANGE_REQS" 2>"$OUT/ranges.err"); then
        read -r p50 p99 mean <<<"$v"
        record "$r" "$srv" "range${tag}_cold_p50" "$p50"
        record "$r" "$srv" "range${tag}_cold_p99" "$p99"
      else
        problem "$srv: random ${tag} range GETs failed: $(head -c 300 "$OUT/ranges.err")"
        continue
      fi
      if v=$(timeout 300 python3 "$BENCH/mount-read-ranges.py" "$url" "$BIG_SIZE" "$len" "$RANGE_REQS" 2>"$OUT/ranges.err"); then
        read -r p50 p99 mean <<<"$v"
        record "$r" "$srv" "range${tag}_warm_p50" "$p50"
        record "$r" "$srv" "range${tag}_warm_p99" "$p99"
      else
        problem "$srv: random ${tag} range GETs (warm) failed: $(head -c 300 "$OUT/ranges.err")"
      fi
    done
  done
}

# Byte checks (not timed): the whole of both files, and 300 random 64 KiB
# ranges of the big one, read through the mount and compared with the disk.
s_check() {
  local c=$1
  [ "$c" = local ] && return 0
  prepare_cold "$c" || return 0
  local f limit=()
  # httpdirfs is too slow (~1.3 MB/s) to read the whole GiB in reasonable time.
  [ "$c" != httpdirfs ] || limit=(-n $((CHECK_SLOW_MIB * 1048576)))
  for f in "$BIG" "$VIDEO"; do
    if ! timeout -k 5 900 cmp "${limit[@]}" "$DATA/$f" "$MNT/$c/$f" >"$OUT/cmp.out" 2>&1; then
      problem "$c: $f read through the mount differs from the disk (cmp ${limit[*]}): $(head -c 300 "$OUT/cmp.out")"
    fi
  done
  unmount_client
  prepare_cold "$c" || return 0
  if ! timeout -k 5 600 python3 - "$DATA/$BIG" "$MNT/$c/$BIG" >"$OUT/check.out" 2>&1 <<'PY'; then
import os, random, sys
a, b = (os.open(p, os.O_RDONLY) for p in sys.argv[1:3])
size = os.fstat(a).st_size
rng = random.Random(7)
bad = 0
for _ in range(300):
    off = rng.randrange(0, size - 65536)
    if os.pread(a, 65536, off) != os.pread(b, 65536, off):
        bad += 1
        print(f"range at {off} differs")
tail_a, tail_b = os.pread(a, 65536, size - 1000), os.pread(b, 65536, size - 1000)
if tail_a != tail_b:
    bad += 1
    print(f"tail differs: {len(tail_a)} vs {len(tail_b)} bytes")
sys.exit(1 if bad else 0)
PY
    problem "$c: random 64 KiB ranges through the mount differ from the disk: $(head -c 300 "$OUT/check.out" | tr '\n' ' ')"
  fi
  unmount_client
}

# ---------------------------------------------------------------- 8. cleanup
cleanup() {
  local rc=$?
  trap - EXIT
  set +e
  unmount_client
  local m p
  for m in "$MNT"/*; do
    [ -d "$m" ] && is_mounted "$m" && { fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; }
  done
  for p in "${SERVER_PIDS[@]}"; do
    kill "$p" 2>/dev/null
  done
  for p in "${SERVER_PIDS[@]}"; do
    wait "$p" 2>/dev/null
  done
  rm -rf "$WORK/rclone-cache-off" "$WORK/rclone-cache-full" "$WORK/httpdirfs-xdg"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 9. run
start_servers

# One mount per client up front: a failing client shows up now, not midway.
read -r -a CL <<<"$CLIENTS"
log "byte checks through every mount"
for c in "${CL[@]}"; do s_check "$c"; done

START=$(date -u '+%Y-%m-%d %H:%M UTC')
LOADS=()
for r in $(seq "$RUNS"); do
  wait_quiet "round $r"
  LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
  # Rotate the client order every round.
  order=()
  for i in "${!CL[@]}"; do order+=("${CL[$(((i + r - 1) % ${#CL[@]}))]}"); done
  log "round $r/$RUNS: ${order[*]}"
  for c in "${order[@]}"; do
    log "  $c: sequential"
    s_seq "$r" "$c"
  done
  for c in "${order[@]}"; do
    log "  $c: random 64 KiB"
    s_rand "$r" "$c"
  done
  for c in "${order[@]}"; do
    log "  $c: ffprobe, seek+decode"
    s_video "$r" "$c"
  done
  for c in "${order[@]}"; do
    case $c in local | httpdirfs) continue ;; esac
    log "  $c: sequential and random with the server's page cache warm"
    s_hot "$r" "$c"
  done
  log "  servers without FUSE: random range GETs"
  s_ranges "$r"
  servers_alive || true
  others=$(others_active)
  [ -z "$others" ] || {
    log "another benchmark active at the end of round $r: $(echo "$others" | tr '\n' ';')"
    OVERLAPS+=("round $r (active at its end)")
  }
done
servers_alive || true

# What the FUSE clients and servers logged: ERROR lines and panics are
# problems; WARN lines are summarised (message without timestamp) as notes.
: >"$OUT/notes.txt"
for f in "$LOGS"/ferry.log "$LOGS"/ferry-serve.err "$LOGS"/rclone-off.log "$LOGS"/rclone-full.log "$LOGS"/rclone-serve.log; do
  [ -f "$f" ] || continue
  clean=$(sed 's/\x1b\[[0-9;]*m//g' "$f")
  n=$(grep -cE '(^|[ :])ERROR[ :]|panick' <<<"$clean" || true)
  ((n == 0)) || problem "$(basename "$f") has $n ERROR/panic lines, e.g.: $(grep -E '(^|[ :])ERROR[ :]|panick' <<<"$clean" | head -n 2 | cut -c1-240 | tr '\n' ' ')"
  warns=$(grep -E '^[0-9TZ:.-]+ +WARN |^[0-9/]+ [0-9:]+ NOTICE' <<<"$clean" |
    sed -E 's/^[0-9TZ:.-]+ +WARN //; s/^[0-9\/]+ [0-9:]+ NOTICE: //; s/LockOwner\([0-9]+\)/LockOwner(N)/; s/fh: [0-9]+/fh: N/' |
    sort | uniq -c | sort -rn | head -n 5 || true)
  [ -z "$warns" ] || while read -r cnt msg; do
    printf '%s: %s × `%s`\n' "$(basename "$f")" "$cnt" "$(cut -c1-160 <<<"$msg")" >>"$OUT/notes.txt"
  done <<<"$warns"
done

# ---------------------------------------------------------------- 10. report
{
  echo "START=$START"
  echo "RUNS=$RUNS"
  echo "CACHE_SIZE=$CACHE_SIZE"
  echo "RAND_IOS=$RAND_IOS"
  echo "RAND_MAX_S=$RAND_MAX_S"
  echo "SEQ_MAX_S=$SEQ_MAX_S"
  echo "CHECK_SLOW_MIB=$CHECK_SLOW_MIB"
  echo "RANGE_REQS=$RANGE_REQS"
  echo "BIG_MIB=$BIG_MIB"
  echo "DROP_CACHES=$DROP_CACHES"
  echo "CLIENTS=$CLIENTS"
  echo "FERRY_REV=$FERRY_REV"
  echo "FERRY_BUILT=$FERRY_BUILT"
  echo "RCLONE=$(rclone version 2>/dev/null | head -n 1)"
  echo "HTTPDIRFS=$(httpdirfs --version 2>&1 | head -n 1)"
  echo "FUSE2=$(httpdirfs --version 2>&1 | grep -i 'FUSE library' | head -n 1)"
  echo "FIO=$(fio --version)"
  echo "FFMPEG=$(ffmpeg -version | head -n 1 | cut -d' ' -f1-3)"
  echo "NGINX=$("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //')"
  echo "KERNEL=$(uname -r)"
  echo "CPU=$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
  echo "MEM=$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "FS=$(df -T "$DATA" | awk 'NR == 2 { print $2 " on " $1 }')"
  echo "VIDEO_SIZE=$VIDEO_SIZE"
  echo "VIDEO_BOXES=$VIDEO_BOXES"
  echo "LOADS=$(IFS=';'; echo "${LOADS[*]}")"
  echo "OVERLAPS=$(IFS=';'; echo "${OVERLAPS[*]:-}")"
} >"$META"

python3 "$BENCH/mount-read-report.py" "$RAW" "$META" "$OUT/problems.txt" "$OUT/notes.txt" >"$OUT/section.md"
cat "$OUT/section.md"
if [ "${NO_RESULTS:-0}" != 1 ]; then
  python3 "$BENCH/mount-read-report.py" --splice "$RESULTS" "$OUT/section.md"
  log "wrote the mount-read section of $RESULTS; raw figures in $RAW, logs in $LOGS"
fi
