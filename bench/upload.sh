#!/usr/bin/env bash
# bench/upload.sh: uploading one 1 GiB file with `ferry put` (resumable chunk
# sessions; default transport, and `--transport http` chunk PUTs when the
# binary has that option) against a single streamed `curl -T` PUT to the same
# ferry server and against `rclone copyto` to `rclone serve webdav`.
#
# Every measurement gets a fresh server on a fresh, empty store (so the target
# never exists beforehand and each server's /proc counters cover exactly one
# upload); all stores and the source live on the same filesystem. The tools
# take turns going first. For every upload it records:
#   * wall-clock seconds of the client command (bash `time`), and its CPU,
#   * the server's CPU (utime+stime) and its /proc/PID/io counters
#     (write_bytes = bytes this process caused to be written to disk,
#     wchar/rchar = bytes passed to write()/read()),
#   * the size of the stored file (sha256 on the first run of each tool),
#   * how long an fsync of the stored file takes right after (ferry fsyncs
#     before it answers; rclone serve does not),
# then one profiled `ferry put` per transport (phases: until the session
# exists, chunk transfer with the client hashing what it reads, server
# verify+commit), a `dd conv=fsync` disk reference, and a
# check of what one write() size costs the kernel on this machine (dd with
# 4 MiB vs 1 MiB writes after a pause).
# Writes the "## upload (ferry put vs single PUT vs rclone)" section of
# bench/RESULTS.md (replacing an older one) and prints it.
#
# Environment knobs (defaults in brackets):
#   BENCH_DIR    work dir for the source file and the stores [/tmp/ferry-upload-bench]
#   RUNS         repetitions of every measurement [5]
#   SIZE_MIB     size of the random source file in MiB [1024]
#   EXTRA_PARALLEL  also measure `ferry put --parallel N`; empty to skip [4]
#   RESULTS      file to update [bench/RESULTS.md]
#   SKIP_BUILD   set to 1 to use the existing target/release/ferry
#   WAIT_MAX     seconds to wait for other benchmarks (bench/*.sh, wrk) to
#                finish before measuring [1800]
#   QUIET_MAX / QUIET_CORES  before each upload, wait up to QUIET_MAX s for
#                other processes to use < QUIET_CORES cores [120 / 0.3]
#   WRITE_CHECK  set to 0 to skip the dd write-size check [1]
#
# Needs root (or sudo) only to apt-get install rclone and curl when missing.
# Safe to re-run: the source file is reused, stores are recreated, the
# section in RESULTS.md is replaced, servers are stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
WORK=${BENCH_DIR:-/tmp/ferry-upload-bench}
RUNS=${RUNS:-5}
SIZE_MIB=${SIZE_MIB:-1024}
EXTRA_PARALLEL=${EXTRA_PARALLEL-4}
RESULTS=${RESULTS:-$BENCH/RESULTS.md}
WAIT_MAX=${WAIT_MAX:-1800}
QUIET_MAX=${QUIET_MAX:-120}
QUIET_CORES=${QUIET_CORES:-0.3}
SIZE=$((SIZE_MIB * 1024 * 1024))
SRC=$WORK/source.bin
NAME=big.bin
FSTORE=$WORK/ferry-store
RSTORE=$WORK/rclone-store
STATE=$WORK/ferry-state
SECTION_TITLE="## upload (ferry put vs single PUT vs rclone)"

log() { printf '[upload.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
PROBLEMS=()
problem() {
  log "PROBLEM: $*"
  PROBLEMS+=("$*")
}

# ---------------------------------------------------------------- 1. peers
if ! command -v rclone >/dev/null || ! command -v curl >/dev/null; then
  log "installing rclone and curl"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y rclone curl
fi
command -v rclone >/dev/null || die "rclone not found after install"
command -v curl >/dev/null || die "curl not found after install"

# ---------------------------------------------------------------- 2. build
mkdir -p "$WORK"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "cargo build --release (may wait for the cargo lock)"
  (cd "$ROOT" && cargo build --release --bin ferry) || die "cargo build --release failed"
fi
[ -x "$TARGET_DIR/release/ferry" ] || die "no $TARGET_DIR/release/ferry"
# Private copy: a concurrent `cargo build` must not swap the binary mid-run.
cp -f "$TARGET_DIR/release/ferry" "$WORK/ferry"
FERRY_BIN=$WORK/ferry
FERRY_REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(cd "$ROOT" && git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
  FERRY_REV="$FERRY_REV+uncommitted changes in src/"
fi

if [ "$(stat -c %s "$SRC" 2>/dev/null || echo 0)" != "$SIZE" ]; then
  log "writing $SIZE_MIB MiB of random data to $SRC"
  dd if=/dev/urandom of="$SRC.tmp" bs=1M count="$SIZE_MIB" status=none
  mv "$SRC.tmp" "$SRC"
fi
log "sha256 of the source"
SRC_SHA=$(sha256sum "$SRC" | awk '{ print $1 }')
# Every tool reads the source from the page cache.
cat "$SRC" >/dev/null

# ---------------------------------------------------------------- servers
export RCLONE_CONFIG=$WORK/rclone.conf # empty: nothing from ~/.config/rclone
: >"$RCLONE_CONFIG"
SRV_PID=""
SRV_URL=""

stop_server() {
  if [ -n "$SRV_PID" ]; then
    kill "$SRV_PID" 2>/dev/null || true
    local i
    for i in $(seq 100); do
      kill -0 "$SRV_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$SRV_PID" 2>/dev/null; then
      problem "server $SRV_PID still running 10 s after SIGTERM; sent SIGKILL"
      kill -KILL "$SRV_PID" 2>/dev/null || true
    fi
    wait "$SRV_PID" 2>/dev/null || true
    SRV_PID=""
  fi
}

fresh_dir() {
  rm -rf "$1"
  mkdir -p "$1"
}

start_ferry() {
  stop_server
  fresh_dir "$FSTORE"
  : >"$WORK/ferry.out"
  "$FERRY_BIN" serve --store "$FSTORE" --listen 127.0.0.1:0 >"$WORK/ferry.out" 2>>"$WORK/ferry.err" &
  SRV_PID=$!
  local i
  for i in $(seq 400); do
    grep -q '^ferry serving ' "$WORK/ferry.out" && break
    kill -0 "$SRV_PID" 2>/dev/null || die "ferry exited at start: $(tail -n 5 "$WORK/ferry.err")"
    sleep 0.05
  done
  SRV_URL=$(sed -n 's|^ferry serving .* at \(http://[^ ]*\)$|\1|p' "$WORK/ferry.out" | head -n 1)
  [ -n "$SRV_URL" ] || die "ferry did not print 'ferry serving ... at http://ADDR'"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# rclone's defaults on both sides: `serve webdav` with --vfs-cache-mode off
# (writes stream straight into the target file; "writes" would stage a copy
# in the VFS cache and write every byte twice), a plain webdav remote.
start_rclone() {
  stop_server
  fresh_dir "$RSTORE"
  local port=${RCLONE_PORT:-18090}
  while port_in_use "$port"; do port=$((port + 1)); done
  rclone serve webdav "$RSTORE" --addr "127.0.0.1:$port" >>"$WORK/rclone-serve.log" 2>&1 &
  SRV_PID=$!
  SRV_URL="http://127.0.0.1:$port"
  local i code
  for i in $(seq 400); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X PROPFIND -H 'Depth: 0' "$SRV_URL/") || true
    [ "$code" = 207 ] && return 0
    kill -0 "$SRV_PID" 2>/dev/null || die "rclone serve exited at start: $(tail -n 5 "$WORK/rclone-serve.log")"
    sleep 0.05
  done
  die "rclone serve webdav did not answer on $SRV_URL"
}

cleanup() {
  local rc=$?
  trap - EXIT
  [ -z "${PROFILE_PID:-}" ] || kill "$PROFILE_PID" 2>/dev/null || true
  stop_server
  rm -rf "$FSTORE" "$RSTORE" "$STATE" "$WORK/dd.bin" "$WORK/section.md" "$RESULTS.tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers
NPROC=$(nproc)
MEM_GIB=$(awk '/^MemTotal:/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
CLK_TCK=$(getconf CLK_TCK)

median() {
  printf '%s\n' "$@" | awk '/^[0-9.eE+-]+$/' | sort -g |
    awk '{ a[NR] = $1 } END {
      if (NR == 0) print "n/a";
      else if (NR % 2) printf "%.6g\n", a[(NR + 1) / 2];
      else printf "%.6g\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
fmt() { awk -v x="$1" -v p="${2:-0}" 'BEGIN { if (x == "n/a" || x == "") print "n/a"; else printf "%.*f\n", p, x }'; }
# calc EXPR [precision]: awk arithmetic on numbers, n/a if any operand is n/a.
calc() {
  case "$1" in *n/a*) echo n/a; return ;; esac
  awk "BEGIN { x = $1; printf \"%.${2:-3}f\n\", x }"
}

declare -A R
add() { R[$1]="${R[$1]:-} $2"; }
med() {
  # shellcheck disable=SC2086
  median ${R[$1]:-}
}
runs_of() { echo "${R[$1]:-}" | sed 's/^ *//'; }

# /proc/PID/io field (write_bytes, wchar, rchar, cancelled_write_bytes).
io_of() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/io"; }
# utime + stime (utime alone) of PID in clock ticks.
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
utime_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 }'; }
now() { date +%s.%N; }
# Busy ticks of the whole machine (user nice system irq softirq steal).
busy_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# ---------------------------------------------------------------- 3. wait
waited=0
# Other benchmarks: bench/*.sh scripts other than this one, and wrk.
others() {
  pgrep -af 'bench/[A-Za-z0-9_.-]+\.sh|(^|/)wrk( |$)' | grep -v 'bench/upload' | awk '{ print $1 }' || true
}
while [ -n "$(others)" ]; do
  if ((waited >= WAIT_MAX)); then
    problem "another benchmark was still running after ${WAIT_MAX}s of waiting (pids $(others | tr '\n' ' ')); measured anyway"
    break
  fi
  log "another benchmark is running ($(others | tr '\n' ' ')); waiting"
  sleep 20
  waited=$((waited + 20))
done
((waited == 0)) || log "waited ${waited}s for another benchmark"
WAIT_NOTE="no other benchmark (bench/*.sh, wrk) was running when the measurements started"
((waited == 0)) || WAIT_NOTE="$WAIT_NOTE (after waiting ${waited} s for one to finish)"
[ -z "$(others)" ] || WAIT_NOTE="another benchmark was still running when the measurements started (after ${waited} s of waiting)"

# Before each upload, wait up to QUIET_MAX seconds for the machine to be
# quiet (other processes using < QUIET_CORES cores over 2 s): compiles come
# and go on this shared machine. The noise that remains is reported.
quiet_once() {
  local b0 b1
  b0=$(busy_ticks)
  sleep 2
  b1=$(busy_ticks)
  awk -v d=$((b1 - b0)) -v hz="$CLK_TCK" -v lim="$QUIET_CORES" 'BEGIN { exit !(d / hz / 2 < lim) }'
}
wait_quiet() {
  local start=$SECONDS
  until quiet_once; do
    if ((SECONDS - start >= QUIET_MAX)); then
      log "machine still busy after ${QUIET_MAX}s; measuring anyway"
      return
    fi
  done
}

# ---------------------------------------------------------------- 4. runs
# measure TOOL RUN: one upload with a fresh server and store.
measure() {
  local tool=$1 run=$2 store stored cmd=()
  case $tool in
    put*)
      start_ferry
      store=$FSTORE
      rm -rf "$STATE"
      mkdir -p "$STATE"
      cmd=(env FERRY_STATE_DIR="$STATE" "$FERRY_BIN" put "$SRC" "$NAME" --server "$SRV_URL")
      # shellcheck disable=SC2207
      cmd+=($(put_args "$tool"))
      ;;
    single)
      start_ferry
      store=$FSTORE
      cmd=(curl -sS -f -o "$WORK/client.body" -w '%{http_code}\n' -T "$SRC" "$SRV_URL/v1/files/$NAME")
      ;;
    rclone)
      start_rclone
      store=$RSTORE
      cmd=(env RCLONE_CONFIG_BENCH_TYPE=webdav RCLONE_CONFIG_BENCH_URL="$SRV_URL"
        RCLONE_CONFIG_BENCH_VENDOR=other rclone copyto "$SRC" "bench:$NAME")
      ;;
  esac
  stored=$store/$NAME
  [ ! -e "$stored" ] || die "$stored exists before the $tool upload"
  cat "$SRC" >/dev/null # every tool reads the source from the page cache
  # Flush dirty pages (earlier runs, other users) so that their writeback
  # does not land in this measurement.
  sync
  wait_quiet
  local load wb0 wc0 rc0 cw0 cpu0 wb1 wc1 rc1 cw1 cpu1 ut0 ut1 sys0 sys1 other rcode=0 wall user sys
  load=$(awk '{ print $1 }' /proc/loadavg)
  wb0=$(io_of "$SRV_PID" write_bytes) wc0=$(io_of "$SRV_PID" wchar)
  rc0=$(io_of "$SRV_PID" rchar) cw0=$(io_of "$SRV_PID" cancelled_write_bytes)
  cpu0=$(cpu_ticks "$SRV_PID")
  ut0=$(utime_ticks "$SRV_PID")
  sys0=$(busy_ticks)
  local TIMEFORMAT='%3R %3U %3S'
  if { time timeout 900 "${cmd[@]}" >"$WORK/client.out" 2>"$WORK/client.err"; } 2>"$WORK/client.time"; then
    rcode=0
  else
    rcode=$?
  fi
  kill -0 "$SRV_PID" 2>/dev/null || die "the $tool server died: $(tail -n 5 "$WORK/ferry.err" "$WORK/rclone-serve.log")"
  wb1=$(io_of "$SRV_PID" write_bytes) wc1=$(io_of "$SRV_PID" wchar)
  rc1=$(io_of "$SRV_PID" rchar) cw1=$(io_of "$SRV_PID" cancelled_write_bytes)
  cpu1=$(cpu_ticks "$SRV_PID")
  ut1=$(utime_ticks "$SRV_PID")
  sys1=$(busy_ticks)
  read -r wall user sys <"$WORK/client.time"
  if [ "$rcode" != 0 ]; then
    problem "$tool run $run: exit status $rcode: $(tail -n 3 "$WORK/client.err" | tr '\n' ' ')"
    stop_server
    return
  fi
  # What the client says.
  case $tool in
    put*)
      local want="uploaded $NAME ($SIZE bytes; sent $SIZE bytes, 0 already on the server)"
      grep -qxF "$want" "$WORK/client.out" ||
        problem "$tool run $run: ferry put printed '$(head -c 300 "$WORK/client.out")', expected '$want'"
      ;;
    single)
      grep -qx 201 "$WORK/client.out" || problem "single run $run: HTTP status $(cat "$WORK/client.out") (want 201)"
      ;;
  esac
  # What the store holds.
  local got sha="" t0 t1
  got=$(stat -c %s "$stored" 2>/dev/null || echo missing)
  if [ "$got" != "$SIZE" ]; then
    problem "$tool run $run: stored size $got, want $SIZE"
    stop_server
    return
  fi
  if [ "$run" = 1 ]; then
    sha=$(sha256sum "$stored" | awk '{ print $1 }')
    if [ "$sha" = "$SRC_SHA" ]; then
      add "$tool.sha_ok" 1
    else
      problem "$tool run $run: stored sha256 $sha differs from the source's $SRC_SHA"
    fi
  fi
  t0=$(now)
  sync "$stored" # fsync of just this file
  t1=$(now)
  if [[ $tool == put* ]]; then
    local left
    left=$(find "$FSTORE/.ferry" -type f -path '*uploads*' -name data 2>/dev/null | wc -l)
    [ "$left" = 0 ] || problem "$tool run $run: $left staging data file(s) left under .ferry/uploads after commit"
  fi
  stop_server
  add "$tool.wall" "$wall"
  add "$tool.ccpu" "$(calc "$user + $sys")"
  add "$tool.cuser" "$user"
  add "$tool.csys" "$sys"
  add "$tool.scpu" "$(calc "($cpu1 - $cpu0) / $CLK_TCK" 2)"
  add "$tool.suser" "$(calc "($ut1 - $ut0) / $CLK_TCK" 2)"
  add "$tool.wb" "$(calc "($wb1 - $wb0) / $SIZE")"
  add "$tool.wc" "$(calc "($wc1 - $wc0) / $SIZE")"
  add "$tool.rc" "$(calc "($rc1 - $rc0) / $SIZE")"
  add "$tool.cw" "$(calc "($cw1 - $cw0) / $SIZE")"
  add "$tool.fsync" "$(calc "$t1 - $t0")"
  add "$tool.load" "$load"
  # Cores kept busy by everything else on the machine during the upload.
  other=$(calc "(($sys1 - $sys0) / $CLK_TCK - $user - $sys - ($cpu1 - $cpu0) / $CLK_TCK) / $wall" 2)
  other=$(calc "$other < 0 ? 0 : $other" 2)
  add "$tool.other" "$other"
  log "$tool run $run: ${wall}s ($(calc "$SIZE / $wall / 1e6" 0) MB/s), client CPU ${user}u+${sys}s, server CPU $(calc "($cpu1 - $cpu0) / $CLK_TCK" 2)s ($(calc "($ut1 - $ut0) / $CLK_TCK" 2) user), server write_bytes $((wb1 - wb0)) ($(calc "($wb1 - $wb0) / $SIZE")x), wchar $((wc1 - wc0)), rchar $((rc1 - rc0)), cancelled $((cw1 - cw0)); fsync after $(calc "$t1 - $t0")s; load $load, other processes busy $other cores${sha:+; sha256 ok}"
}

# `ferry put` variants: put = defaults; puthttp = --transport http (chunk
# PUTs; only if this binary has the option); putn = --parallel N.
HAS_TRANSPORT=0
"$FERRY_BIN" put --help 2>/dev/null | grep -q -- '--transport' && HAS_TRANSPORT=1
DEFAULT_TRANSPORT=$("$FERRY_BIN" put --help 2>/dev/null | awk '/--transport/ { t = 1 } t && /default:/ { sub(/.*default: */, ""); sub(/\].*/, ""); print; exit }')
put_args() {
  case $1 in
    puthttp) echo "--transport http" ;;
    putn) echo "--parallel $EXTRA_PARALLEL" ;;
  esac
}
TOOLS=(put)
((HAS_TRANSPORT)) && TOOLS+=(puthttp)
TOOLS+=(single rclone)
[ -z "$EXTRA_PARALLEL" ] || TOOLS+=(putn)
PUTS=()
for t in "${TOOLS[@]}"; do [[ $t != put* ]] || PUTS+=("$t"); done
NT=${#TOOLS[@]}
: >"$WORK/ferry.err"
: >"$WORK/rclone-serve.log"
for run in $(seq "$RUNS"); do
  # Rotate who goes first.
  for k in $(seq 0 $((NT - 1))); do
    measure "${TOOLS[$(((k + run - 1) % NT))]}" "$run"
  done
  # Disk reference: the same bytes with dd, fsynced, onto the same filesystem.
  sync
  wait_quiet
  t0=$(now)
  dd if="$SRC" of="$WORK/dd.bin" bs=1M conv=fsync status=none
  t1=$(now)
  rm -f "$WORK/dd.bin"
  add dd.wall "$(calc "$t1 - $t0")"
  log "dd conv=fsync run $run: $(calc "$t1 - $t0")s"
done

# ---------------------------------------------------------------- 5. profile
# One more `ferry put`, sampled every 0.1 s: the resume record appears when
# the session exists; the server's write_bytes reaches the file size when all
# chunks are on disk; the rest is the server's verify + commit.
log "profiled ferry put"
start_ferry
# The chunk size the server picks for this file size (a session opened and aborted).
CHUNK=n/a
if created=$(curl -sS -f -X POST -H 'Content-Type: application/json' \
  -d "{\"path\":\"probe.bin\",\"size\":$SIZE}" "$SRV_URL/v1/uploads"); then
  CHUNK=$(sed -n 's/.*"chunk_size":\([0-9]*\).*/\1/p' <<<"$created")
  id=$(sed -n 's/.*"id":"\([^"]*\)".*/\1/p' <<<"$created")
  [ -z "$id" ] || curl -sS -f -o /dev/null -X DELETE "$SRV_URL/v1/uploads/$id" || true
fi
[ -n "$CHUNK" ] || CHUNK=n/a
CHUNK_DESC=$(case $CHUNK in n/a) echo "chunks of the server's default size" ;; *) echo "$((CHUNK / 1048576)) MiB chunks (the server's default for this size, $(((SIZE + CHUNK - 1) / CHUNK)) chunks)" ;; esac)
stop_server

# profile TOOL: one sampled `ferry put`; sets PROF_SUMMARY.
profile() {
  local tool=$1 prof=$WORK/profile-$1.tsv
  start_ferry
  rm -rf "$STATE"
  mkdir -p "$STATE"
  cat "$SRC" >/dev/null
  sync
  wait_quiet
  printf 't\trecord\tclient_ticks\tserver_ticks\tserver_write_bytes\tserver_rchar\n' >"$prof"
  local sleepfd wb0 rc0 s0 t0 c c_last=0 rec prc=0 t_end s_end
  exec {sleepfd}<> <(:)
  wb0=$(io_of "$SRV_PID" write_bytes)
  rc0=$(io_of "$SRV_PID" rchar)
  s0=$(cpu_ticks "$SRV_PID")
  t0=$(now)
  # shellcheck disable=SC2046
  FERRY_STATE_DIR="$STATE" "$FERRY_BIN" put "$SRC" "$NAME" --server "$SRV_URL" $(put_args "$tool") \
    >"$WORK/client.out" 2>"$WORK/client.err" &
  PROFILE_PID=$!
  while kill -0 "$PROFILE_PID" 2>/dev/null; do
    c=$(cpu_ticks "$PROFILE_PID" 2>/dev/null) || true
    [ -n "$c" ] || c=$c_last
    c_last=$c
    rec=0
    compgen -G "$STATE/transfers/*.json" >/dev/null && rec=1
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$(calc "$(now) - $t0")" "$rec" "$c" \
      "$(($(cpu_ticks "$SRV_PID") - s0))" "$(($(io_of "$SRV_PID" write_bytes) - wb0))" \
      "$(($(io_of "$SRV_PID" rchar) - rc0))" >>"$prof"
    read -r -t 0.1 -u "$sleepfd" _ || true
  done
  wait "$PROFILE_PID" || prc=$?
  PROFILE_PID=""
  t_end=$(calc "$(now) - $t0")
  s_end=$(($(cpu_ticks "$SRV_PID") - s0))
  stop_server
  exec {sleepfd}<&-
  [ "$prc" = 0 ] || problem "profiled $tool: exit status $prc: $(tail -n 3 "$WORK/client.err" | tr '\n' ' ')"
  # Phase boundaries from the samples (first sample at or past each event).
  local p_hash p_hash_c p_data p_data_c p_data_s c_end
  read -r p_hash p_hash_c p_data p_data_c p_data_s <<<"$(awk -F'\t' -v size="$SIZE" '
    NR == 1 { next }
    !h && $2 == 1 { h = $1; hc = $3 }
    !d && $5 >= size { d = $1; dc = $3; ds = $4 }
    END { printf "%s %s %s %s %s\n", h ? h : "n/a", h ? hc : "n/a", d ? d : "n/a", d ? dc : "n/a", d ? ds : "n/a" }' "$prof")"
  c_end=$(awk -F'\t' 'END { print $3 }' "$prof")
  if [ "$p_hash" = n/a ] || [ "$p_data" = n/a ]; then
    PROF_SUMMARY="profile incomplete (see $prof)"
  else
    PROF_SUMMARY="total $(fmt "$t_end" 2) s = until the session exists $(fmt "$p_hash" 2) s (client CPU $(calc "$p_hash_c / $CLK_TCK" 2) s) + chunk transfer, the client hashing what it reads, $(calc "$p_data - $p_hash" 2) s (client CPU $(calc "($p_data_c - $p_hash_c) / $CLK_TCK" 2) s, server CPU $(calc "$p_data_s / $CLK_TCK" 2) s) + server verify and commit $(calc "$t_end - $p_data" 2) s (server CPU $(calc "($s_end - $p_data_s) / $CLK_TCK" 2) s, client CPU $(calc "($c_end - $p_data_c) / $CLK_TCK" 2) s)"
  fi
  log "profile $tool: $PROF_SUMMARY"
}
declare -A PROFILES
for t in put puthttp; do
  [[ " ${TOOLS[*]} " == *" $t "* ]] || continue
  profile "$t"
  PROFILES[$t]=$PROF_SUMMARY
done
# SHA-256 speed of this CPU, for reference.
wait_quiet
t0=$(now)
if command -v openssl >/dev/null; then
  SHA_TOOL="openssl dgst -sha256"
  openssl dgst -sha256 "$SRC" >/dev/null
else
  SHA_TOOL=sha256sum
  sha256sum "$SRC" >/dev/null
fi
SHA_REF=$(calc "$(now) - $t0" 2)

# What one write() size costs the kernel here: the same 1 GiB written with
# 4 MiB and with 1 MiB write() calls (no fsync), each after a 20 s pause.
WRITE_CHECK_TXT=""
PAGE_REPORTING="free page reporting"
if [ -r /sys/module/page_reporting/parameters/reported_kib ]; then
  PAGE_REPORTING="free page reporting is on: $(($(cat /sys/module/page_reporting/parameters/reported_kib) / 1048576)) GiB reported so far, in blocks of order $(cat /sys/module/page_reporting/parameters/page_reporting_order 2>/dev/null || echo '?')"
fi
if [ "${WRITE_CHECK:-1}" = 1 ]; then
  log "write-size check (dd bs=4M vs bs=1M after 20 s pauses)"
  for bs in 4M 1M 4M 1M; do
    sync
    sleep 20
    TIMEFORMAT='%3R %3S'
    { time dd if="$SRC" of="$WORK/dd.bin" bs=$bs status=none; } 2>"$WORK/dd.time"
    read -r w sy <"$WORK/dd.time"
    rm -f "$WORK/dd.bin"
    add "ddw$bs.wall" "$w"
    add "ddw$bs.sys" "$sy"
    log "dd bs=$bs: ${w}s wall, ${sy}s sys"
  done
  WRITE_CHECK_TXT="Write size matters on this machine: after a 20 s pause, writing the 1 GiB file into a new file on the same filesystem with \`dd bs=4M\` took $(fmt "$(med ddw4M.wall)" 2) s wall, $(fmt "$(med ddw4M.sys)" 2) s system CPU [runs: $(runs_of ddw4M.sys)], and with \`dd bs=1M\` $(fmt "$(med ddw1M.wall)" 2) s wall, $(fmt "$(med ddw1M.sys)" 2) s system CPU [$(runs_of ddw1M.sys)]. Run right after another big write, 4 MiB writes cost about as little as 1 MiB ones (seen by hand). perf puts the extra time in the kernel's copy into the new page-cache pages (\`copy_folio_from_iter_atomic\`); our reading, not proven: large page-cache folios come from free memory this VM has reported back to its host ($PAGE_REPORTING), so their first touch is expensive. Whatever the cause, on this machine a server that writes a 4 MiB chunk with one write() pays about $(calc "($(med ddw4M.sys) - $(med ddw1M.sys)) * 1073741824 / $SIZE" 1) s of kernel CPU per GiB more than one that writes pieces of 1 MiB or less."
fi

if grep -qiE 'error|panick' "$WORK/ferry.err"; then
  problem "ferry serve logged errors ($(grep -ciE 'error|panick' "$WORK/ferry.err") lines), first: $(grep -iE 'error|panick' "$WORK/ferry.err" | head -n 1 | cut -c1-300)"
fi
if grep -qE 'ERROR|panic' "$WORK/rclone-serve.log"; then
  problem "rclone serve logged errors, first: $(grep -E 'ERROR|panic' "$WORK/rclone-serve.log" | head -n 1 | cut -c1-300)"
fi

# ---------------------------------------------------------------- 6. report
verdict() { # value op target
  awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
    if (v == "n/a" || v == "") { print "**not measured**"; exit }
    ok = (op == ">=") ? (v + 0 >= t + 0) : (v + 0 < t + 0)
    print ok ? "met" : "**MISSED**" }'
}
mbs() { # median wall -> MB/s
  case "$1" in n/a | "") echo n/a ;; *) calc "$SIZE / $1 / 1e6" 0 ;; esac
}
label() {
  case $1 in
    put) echo "\`ferry put\` (defaults${DEFAULT_TRANSPORT:+: --transport $DEFAULT_TRANSPORT}; chunks in flight: 32 MiB worth, 8 of the 4 MiB chunks)" ;;
    puthttp) echo "\`ferry put --transport http\`" ;;
    putn) echo "\`ferry put --parallel $EXTRA_PARALLEL\`" ;;
    single) echo "single PUT (\`curl -T\` to \`/v1/files/\`)" ;;
    rclone) echo "\`rclone copyto\` → \`rclone serve webdav\`" ;;
  esac
}
SINGLE_W=$(med single.wall) RCLONE_W=$(med rclone.wall)
# Throughput ratios of `ferry put` variant $1 against rclone and the single PUT.
vs_rclone() { calc "$RCLONE_W / $(med "$1.wall")" 2; }
vs_single() { calc "$SINGLE_W / $(med "$1.wall")" 2; }
# Durable-to-durable: add the fsync each tool's file still needed afterwards.
dur() { calc "$(med "$1.wall") + $(med "$1.fsync")" 2; }
ALL_OTHER=""
for t in "${TOOLS[@]}"; do ALL_OTHER="$ALL_OTHER ${R[$t.other]:-}"; done
WB_ALL=""
for t in "${PUTS[@]}"; do WB_ALL="$WB_ALL ${R[$t.wb]:-}"; done
# shellcheck disable=SC2086
WB_MAX=$(printf '%s\n' $WB_ALL | sort -g | tail -n 1)
# shellcheck disable=SC2086
OTHER_RANGE=$(printf '%s\n' $ALL_OTHER | sort -g | sed -n '1p;$p' | tr '\n' ' ' | sed 's/ $//; s/ / to /')
TRANSPORT_TXT=""
((HAS_TRANSPORT)) && TRANSPORT_TXT=" By default (\`--transport ${DEFAULT_TRANSPORT:-auto}\`) the chunks travel as messages over one WebSocket (\`GET /v1/ws\`), falling back to HTTP; \`--transport http\` sends each chunk as its own \`PUT /v1/uploads/ID/chunks/N\` (with \`x-ferry-crc32c\`)."

SECTION=$WORK/section.md
{
  echo "$SECTION_TITLE"
  echo
  echo "Produced by \`bench/upload.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC')."
  echo
  echo "- Machine: $NPROC cores ($CPU_MODEL), $MEM_GIB GiB RAM, Linux $(uname -r), a VM; disk: $(df -h --output=source,fstype,size "$WORK" | awk 'NR == 2 { print $1 " (" $2 ", " $3 ")" }'), source file and all stores on it. Shared and noisy: during the uploads other processes kept $(fmt "$(median $ALL_OTHER)" 2) cores busy (median; range $OTHER_RANGE; \`/proc/stat\` minus the client's and server's CPU); $WAIT_NOTE."
  echo "- ferry $FERRY_REV (release build; \`ferry serve --store DIR\`, local-directory store); $(rclone version 2>/dev/null | head -n 1); curl $(curl --version | awk 'NR == 1 { print $2 }')."
  echo "- One ${SIZE_MIB} MiB random file (in the page cache) uploaded over loopback; client and server share the $NPROC cores. Every upload goes to a fresh server on a fresh, empty store (the target never exists beforehand); the tools take turns going first. Before each upload the script waits (up to ${QUIET_MAX} s) until other processes use < $QUIET_CORES cores."
  echo "- \`ferry put SRC $NAME --server URL\` (FERRY_STATE_DIR emptied each run): the client sends $CHUNK_DESC with a CRC32C each, 4 in flight, computing the file's SHA-256 from the chunks as it reads them (the file is read once) and sending the digest with \`complete\`; the server stages the chunks in place in one sparse file, fsyncs each chunk and the chunk map, hashes the chunks as they become contiguous (from the buffers they arrived in), checks the digest on complete (reading only what it had not hashed yet), fsyncs and renames.$TRANSPORT_TXT"
  echo "- Single PUT: \`curl -T SRC URL/v1/files/$NAME\` to the same ferry server (one streamed request, fsynced, committed by rename)."
  echo "- rclone: \`rclone serve webdav DIR --addr 127.0.0.1:PORT\` with its defaults (\`--vfs-cache-mode off\`: the PUT streams straight into the target file, no fsync; \`writes\` would stage a second copy), and \`rclone copyto SRC bench:$NAME\` with a webdav remote from env vars (\`RCLONE_CONFIG_BENCH_TYPE=webdav\`, \`..._URL\`, \`..._VENDOR=other\`) and default flags; the fresh store means it uploads the whole file every run."
  echo "- Seconds: wall clock of the client command (bash \`time\`), median of $RUNS runs, runs in brackets; MB/s = 10^6 bytes/s from the median. CPU: user+sys of the client (bash \`time\`), utime+stime of the server process (\`/proc/PID/stat\`)."
  echo "- Disk writes: the server process's \`write_bytes\` from \`/proc/PID/io\` over the upload (bytes it dirtied for the disk; a byte rewritten after writeback would count twice) divided by the file size; \`wchar\` = bytes passed to write(), \`rchar\` = bytes read (page cache included)."
  echo "- \"+ fsync\": the time a \`sync FILE\` (fsync) of the stored file took right after the upload, added to the wall clock: ferry has fsynced before it answers, rclone serve has not."
  echo
  echo "| tool | seconds, median [runs] | MB/s | s + fsync after | client CPU s | server CPU s | server write_bytes / size [runs] | wchar / size | rchar / size | others' cores |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for t in "${TOOLS[@]}"; do
    echo "| $(label "$t") | $(fmt "$(med "$t.wall")" 2) [$(runs_of "$t.wall")] | $(mbs "$(med "$t.wall")") | $(dur "$t") (fsync $(fmt "$(med "$t.fsync")" 2)) | $(fmt "$(med "$t.ccpu")" 2) ($(fmt "$(med "$t.cuser")" 2) user) | $(fmt "$(med "$t.scpu")" 2) ($(fmt "$(med "$t.suser")" 2) user) | $(fmt "$(med "$t.wb")" 3) [$(runs_of "$t.wb")] | $(fmt "$(med "$t.wc")" 3) | $(fmt "$(med "$t.rc")" 3) | $(fmt "$(med "$t.other")" 2) |"
  done
  echo
  echo "Throughput ratios (inverse ratio of median seconds):"
  echo
  echo "| ferry put variant | / rclone | / single PUT | / rclone, with fsync after | / single PUT, with fsync after |"
  echo "|---|---|---|---|---|"
  for t in "${PUTS[@]}"; do
    echo "| $(label "$t") | **$(vs_rclone "$t")** | **$(vs_single "$t")** | $(calc "$(dur rclone) / $(dur "$t")" 2) | $(calc "$(dur single) / $(dur "$t")" 2) |"
  done
  echo
  echo "Where \`ferry put\`'s time goes (one more run per transport, \`/proc\` sampled every 0.1 s; the phases end when the resume record appears, i.e. the session exists, and when the server's write_bytes reach the file size):"
  echo
  for t in put puthttp; do
    [ -n "${PROFILES[$t]:-}" ] || continue
    echo "- $(label "$t"): ${PROFILES[$t]}."
  done
  echo
  echo "References: \`$SHA_TOOL\` of the file: $SHA_REF s; \`dd bs=1M conv=fsync\` of the file onto the same disk: $(fmt "$(med dd.wall)" 2) s [$(runs_of dd.wall)] ($(mbs "$(med dd.wall)") MB/s)."
  [ -z "$WRITE_CHECK_TXT" ] || { echo; echo "$WRITE_CHECK_TXT"; }
  echo
  echo "Targets (default \`ferry put\`; the other variants for comparison):"
  echo
  echo "| target | measured | verdict |"
  echo "|---|---|---|"
  for t in "${PUTS[@]}"; do
    echo "| $(label "$t") ≥ 1.5× rclone's throughput | $(vs_rclone "$t")× ($(mbs "$(med "$t.wall")") vs $(mbs "$RCLONE_W") MB/s) | $(verdict "$(vs_rclone "$t")" ">=" 1.5) |"
  done
  for t in "${PUTS[@]}"; do
    echo "| $(label "$t") ≥ 0.9× the single PUT's throughput | $(vs_single "$t")× ($(mbs "$(med "$t.wall")") vs $(mbs "$SINGLE_W") MB/s) | $(verdict "$(vs_single "$t")" ">=" 0.9) |"
  done
  echo "| staging writes no byte twice (server write_bytes ≈ 1.0× the file, not 2×) | $(fmt "$(med put.wb)" 3)× median for the default \`ferry put\`, $(fmt "${WB_MAX:-n/a}" 3)× max over all $(echo $WB_ALL | wc -w) \`ferry put\` runs | $(verdict "${WB_MAX:-n/a}" "<" 1.1) |"
  echo
  if ((${#PROBLEMS[@]})); then
    echo "Problems seen during the run:"
    echo
    for p in "${PROBLEMS[@]}"; do echo "- $p"; done
  else
    echo "No errors: every upload exited 0; \`ferry put\` reported all $SIZE bytes sent and 0 already on the server; every single PUT returned 201; every stored file had the source's size and the first run of each tool its sha256; no staging data was left under \`.ferry/uploads\`; neither server logged errors."
  fi
  echo
} >"$SECTION"

# Replace the section in RESULTS.md (or append it).
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
log "wrote $RESULTS; profile samples in $WORK/profile-*.tsv, server logs in $WORK/ferry.err and $WORK/rclone-serve.log"
