#!/usr/bin/env bash
# bench/serve.sh: `ferry serve` against nginx serving the same directory.
#
# Measures, for both servers on loopback:
#   * random-offset 64 KiB and 1 MiB Range requests (wrk + bench/ranges.lua),
#   * one full-file stream of a 1 GiB file (curl),
#   * STREAMS concurrent full-file streams (wrk -cSTREAMS on the 1 GiB file),
# and ferry's peak RSS (VmHWM) during the concurrent streams and while a
# 4 GiB file is streamed up (PUT) and down (GET). Every figure is the median
# of RUNS runs. Writes the "## serve (ferry vs nginx)" section of
# bench/RESULTS.md (replacing an older one) and prints it.
#
# Environment knobs (defaults in brackets):
#   BENCH_DIR   work dir, holds the store and the nginx files [/tmp/ferry-bench]
#   RUNS        repetitions of every measurement [3]
#   DURATION    length of each wrk run [10s]
#   WRK_THREADS / WRK_CONNS   wrk threads / connections for ranges [2 / 32]
#   FULL_RUNS   repetitions of the single full-file stream [max(RUNS, 5)]
#   STREAMS     concurrent full-file streams [200]
#   RESULTS     file to update [bench/RESULTS.md]
#   SKIP_BUILD  set to 1 to use the existing target/release/ferry
#   FERRY_REF   a commit (e.g. HEAD) to export and build under BENCH_DIR
#               instead of building the working tree in place
#
# Needs root (or sudo) only to apt-get install nginx-light, wrk and curl
# when they are missing. Safe to re-run: the 1 GiB file is reused, the
# section in RESULTS.md is replaced, servers are stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
WORK=${BENCH_DIR:-/tmp/ferry-bench}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNS=${WRK_CONNS:-32}
FULL_RUNS=${FULL_RUNS:-$((RUNS > 5 ? RUNS : 5))}
STREAMS=${STREAMS:-200}
RESULTS=${RESULTS:-$BENCH/RESULTS.md}
STORE=$WORK/store
NGX=$WORK/nginx
BIG=big.bin
BIG_SIZE=$((1024 * 1024 * 1024))
HUGE=big4.bin
HUGE_SIZE=$((4 * BIG_SIZE))
SRC4=$WORK/src4.bin # client-side source of the 4 GiB upload (outside the store)

log() { printf '[serve.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
# Problems worth reporting but not worth aborting the whole run for.
PROBLEMS=()
problem() {
  log "PROBLEM: $*"
  PROBLEMS+=("$*")
}

# ---------------------------------------------------------------- 1. peers
NGINX_BIN=$(command -v nginx || true)
[ -n "$NGINX_BIN" ] || { [ -x /usr/sbin/nginx ] && NGINX_BIN=/usr/sbin/nginx; } || true
if [ -z "$NGINX_BIN" ] || ! command -v wrk >/dev/null || ! command -v curl >/dev/null; then
  log "installing nginx-light, wrk and curl"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y nginx-light wrk curl
  NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
fi
[ -x "$NGINX_BIN" ] || die "nginx not found after install"

# ---------------------------------------------------------------- 2. build
mkdir -p "$WORK" "$STORE" "$NGX/tmp"
if [ -n "${FERRY_REF:-}" ]; then
  # A committed revision, exported (git archive) and built apart from the
  # working tree, which may hold someone's unfinished edits.
  FERRY_REV=$(cd "$ROOT" && git rev-parse --short "$FERRY_REF^{commit}") || die "unknown FERRY_REF $FERRY_REF"
  SRC_DIR=$WORK/src-$FERRY_REV
  if [ ! -f "$SRC_DIR/Cargo.toml" ]; then
    rm -rf "$SRC_DIR"
    mkdir -p "$SRC_DIR"
    (cd "$ROOT" && git archive "$FERRY_REV") | tar -x -C "$SRC_DIR"
  fi
  TARGET_DIR=$WORK/target
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release of $FERRY_REV in $SRC_DIR"
    (cd "$SRC_DIR" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --bin ferry) || die "cargo build --release failed"
  fi
else
  TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release (may wait for the cargo lock)"
    (cd "$ROOT" && cargo build --release --bin ferry) || die "cargo build --release failed"
  fi
  FERRY_REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(cd "$ROOT" && git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    FERRY_REV="$FERRY_REV + uncommitted changes in the working tree"
  fi
fi
[ -x "$TARGET_DIR/release/ferry" ] || die "no $TARGET_DIR/release/ferry"
# Private copy: a concurrent `cargo build` must not swap the binary mid-run.
cp -f "$TARGET_DIR/release/ferry" "$WORK/ferry"
FERRY_BIN=$WORK/ferry
FERRY_BUILT=$(date -u -r "$TARGET_DIR/release/ferry" '+%Y-%m-%d %H:%M:%S UTC')

# Leftovers of an interrupted run.
rm -f "$STORE/$HUGE" "$SRC4"
find "$STORE" -mindepth 1 -maxdepth 1 ! -name "$BIG" -exec rm -rf {} +

if [ "$(stat -c %s "$STORE/$BIG" 2>/dev/null || echo 0)" != "$BIG_SIZE" ]; then
  log "writing 1 GiB of random data to $STORE/$BIG"
  dd if=/dev/urandom of="$STORE/$BIG.tmp" bs=1M count=1024 status=none
  mv "$STORE/$BIG.tmp" "$STORE/$BIG"
fi

# ---------------------------------------------------------------- servers
FERRY_PID=""
FERRY_URL=""
NGINX_PID=""
NGINX_URL=""

stop_ferry() {
  if [ -n "$FERRY_PID" ]; then
    kill "$FERRY_PID" 2>/dev/null || true
    local i
    for i in $(seq 100); do
      kill -0 "$FERRY_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$FERRY_PID" 2>/dev/null; then
      problem "ferry still running 10 s after SIGTERM; sent SIGKILL"
      kill -KILL "$FERRY_PID" 2>/dev/null || true
    fi
    wait "$FERRY_PID" 2>/dev/null || true
    FERRY_PID=""
  fi
}

start_ferry() {
  stop_ferry
  : >"$WORK/ferry.out"
  NO_COLOR=1 "$FERRY_BIN" serve --store "$STORE" --listen 127.0.0.1:0 >"$WORK/ferry.out" 2>>"$WORK/ferry.err" &
  FERRY_PID=$!
  local i
  for i in $(seq 400); do
    grep -q '^ferry serving ' "$WORK/ferry.out" && break
    kill -0 "$FERRY_PID" 2>/dev/null || die "ferry exited at start: $(tail -n 5 "$WORK/ferry.err")"
    sleep 0.05
  done
  FERRY_URL=$(sed -n 's|^ferry serving .* at \(http://[^ ]*\)$|\1|p' "$WORK/ferry.out" | head -n 1)
  [ -n "$FERRY_URL" ] || die "ferry did not print 'ferry serving ... at http://ADDR'"
}

ferry_alive() { [ -n "$FERRY_PID" ] && kill -0 "$FERRY_PID" 2>/dev/null; }

# ferry_check WHEN: succeeds while ferry runs; otherwise records how it ended
# (exit status or signal, last stderr lines) as a problem and fails.
ferry_check() {
  ferry_alive && return 0
  [ -n "$FERRY_PID" ] || return 1 # already reported
  local st=0 how
  wait "$FERRY_PID" 2>/dev/null || st=$?
  how="exit status $st"
  if ((st > 128)); then how="killed by signal $((st - 128)), SIG$(kill -l $((st - 128)) 2>/dev/null || echo '?')"; fi
  problem "ferry died $1 ($how); its last stderr lines: $(tail -n 3 "$WORK/ferry.err" | sed 's/\x1b\[[0-9;]*m//g' | tr '\n' ' ')"
  FERRY_PID=""
  return 1
}

# ensure_ferry WHEN: restart ferry if it died (recording that), so the other
# measurements still get made.
ensure_ferry() {
  ferry_check "$1" && return 0
  start_ferry
  F_BIG=$FERRY_URL/v1/files/$BIG
  log "restarted ferry at $FERRY_URL"
}

# kB value of a /proc/PID/status field (VmHWM, VmRSS).
proc_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
ferry_hwm_mib() {
  local kb
  kb=$(proc_kb "$FERRY_PID" VmHWM)
  [ -n "$kb" ] || {
    echo "n/a"
    return
  }
  awk -v kb="$kb" 'BEGIN { printf "%.1f\n", kb / 1024 }'
}

stop_nginx() {
  if [ -n "$NGINX_PID" ]; then
    kill -TERM "$NGINX_PID" 2>/dev/null || true
    wait "$NGINX_PID" 2>/dev/null || true
    NGINX_PID=""
  fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_nginx() {
  local port=${NGINX_PORT:-18080}
  while port_in_use "$port"; do port=$((port + 1)); done
  local temp_paths="client_body_temp_path $NGX/tmp/body;" m nginx_v
  nginx_v=$("$NGINX_BIN" -V 2>&1)
  for m in proxy fastcgi uwsgi scgi; do
    [[ $nginx_v == *"--without-http_${m}_module"* ]] ||
      temp_paths="$temp_paths ${m}_temp_path $NGX/tmp/$m;"
  done
  local user_line=""
  [ "$(id -u)" -ne 0 ] || user_line="user root;" # the store may not be readable by nobody
  cat >"$NGX/nginx.conf" <<EOF
# Written by bench/serve.sh; the same directory ferry serves.
daemon off;
master_process on;
$user_line
worker_processes $NPROC;
pid $NGX/nginx.pid;
error_log $NGX/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    # No tcp_nopush: with it, wrk's keep-alive 64 KiB range requests stall
    # ~40 ms each (delayed-ACK pattern: ~900 req/s instead of ~29000 here).
    keepalive_requests 1000000;
    default_type application/octet-stream;
    $temp_paths
    server {
        listen 127.0.0.1:$port;
        root $STORE;
    }
}
EOF
  "$NGINX_BIN" -t -q -e "$NGX/error.log" -p "$NGX" -c "$NGX/nginx.conf" || die "nginx -t failed, see $NGX/error.log"
  "$NGINX_BIN" -e "$NGX/error.log" -p "$NGX" -c "$NGX/nginx.conf" &
  NGINX_PID=$!
  NGINX_URL="http://127.0.0.1:$port"
  local i
  for i in $(seq 200); do
    curl -sf -o /dev/null -r 0-0 "$NGINX_URL/$BIG" && return 0
    kill -0 "$NGINX_PID" 2>/dev/null || die "nginx exited at start: $(tail -n 5 "$NGX/error.log")"
    sleep 0.05
  done
  die "nginx did not answer on $NGINX_URL"
}

cleanup() {
  local rc=$?
  trap - EXIT
  stop_ferry
  stop_nginx
  rm -f "$STORE/$HUGE" "$SRC4" "$WORK"/*.part
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers
NPROC=$(nproc)
MEM_GIB=$(awk '/^MemTotal:/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)

median() {
  printf '%s\n' "$@" | awk '/^[0-9.eE+-]+$/' | sort -g |
    awk '{ a[NR] = $1 } END {
      if (NR == 0) print "n/a";
      else if (NR % 2) printf "%.6g\n", a[(NR + 1) / 2];
      else printf "%.6g\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
maxof() { printf '%s\n' "$@" | awk '/^[0-9.]+$/' | sort -g | tail -n 1; }
# field NAME LINE: value of NAME=... in a "RESULT k=v ..." line
field() { tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p"; }
fmt() { awk -v x="$1" -v p="${2:-0}" 'BEGIN { if (x == "n/a" || x == "") print "n/a"; else printf "%.*f\n", p, x }'; }

# Results: R[key] holds the space-separated values of the runs.
declare -A R
add() { R[$1]="${R[$1]:-} $2"; }
med() {
  # shellcheck disable=SC2086
  median ${R[$1]:-}
}
runs_of() { echo "${R[$1]:-}" | sed 's/^ *//'; }
# paired KEY_A KEY_B: "r1 r2 ..." ratios of run i of A to run i of B (same
# run, back to back), then their median in the form "MEDIAN (r1 r2 ...)".
paired() {
  local rs
  rs=$(awk -v a="${R[$1]:-}" -v b="${R[$2]:-}" 'BEGIN {
    n = split(a, x, " "); m = split(b, y, " "); if (m < n) n = m
    for (i = 1; i <= n; i++) printf "%s%.2f", (i > 1 ? " " : ""), (y[i] > 0 ? x[i] / y[i] : 0) }')
  # shellcheck disable=SC2086
  echo "$(fmt "$(median $rs)" 2) ($rs)"
}

CLK_TCK=$(getconf CLK_TCK)
# server_ticks WHO: CPU time (user + system, clock ticks) used so far by ferry,
# or by the nginx master and its workers.
server_ticks() {
  local pids p v t=0
  if [ "$1" = ferry ]; then
    pids=$FERRY_PID
  else
    pids="$NGINX_PID $(pgrep -P "$NGINX_PID" 2>/dev/null || true)"
  fi
  for p in $pids; do
    # fields after the ")" closing the command name: utime is the 12th, stime the 13th
    v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }') || v=0
    t=$((t + ${v:-0}))
  done
  echo "$t"
}

# wrk_run NAME URL LEN CONNS: one wrk run; stores req/s, MB/s and the
# server's CPU per request under NAME (NAME starts with ferry or nginx).
wrk_run() {
  local name=$1 url=$2 len=$3 conns=$4 out line t0 t1 who=nginx
  [[ $name != *ferry* ]] || who=ferry
  t0=$(server_ticks "$who")
  # A range response slower than 5 s counts as a wrk timeout error; the
  # full-file streams legitimately take longer than the whole run.
  local timeout=5s
  [ "$len" != 0 ] || timeout=60s
  out=$(wrk -t"$WRK_THREADS" -c"$conns" -d"$DURATION" --timeout "$timeout" \
    -s "$BENCH/ranges.lua" "$url" -- "$len" "$BIG_SIZE" 2>&1) || true
  t1=$(server_ticks "$who")
  printf '### %s %s len=%s c=%s\n%s\n' "$name" "$url" "$len" "$conns" "$out" >>"$WORK/wrk.log"
  line=$(grep '^RESULT' <<<"$out" | tail -n 1 || true)
  if [ -z "$line" ]; then
    problem "$name: wrk produced no result: $(tail -n 3 <<<"$out" | tr '\n' ' ')"
    return
  fi
  local errs
  errs=$(awk '{ s = 0; for (i = 1; i <= NF; i++) if ($i ~ /^err_/) { split($i, kv, "="); s += kv[2] } print s }' <<<"$line")
  if [ "$errs" != 0 ]; then
    problem "$name: wrk reported errors: $(tr ' ' '\n' <<<"$line" | grep '^err_' | tr '\n' ' ')"
  fi
  add "$name.req" "$(field req_s "$line")"
  add "$name.mbs" "$(field mb_s "$line")"
  local cores us_req
  # (a server that died mid-run has no CPU figure: its ticks are gone)
  cores=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v s="$(field secs "$line")" 'BEGIN { if (t < 0 || s <= 0) print "n/a"; else printf "%.2f", t / hz / s }')
  us_req=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$(field requests "$line")" 'BEGIN { if (n > 0 && t >= 0) printf "%.0f", t / hz * 1e6 / n; else print "n/a" }')
  add "$name.cores" "$cores"
  add "$name.us_req" "$us_req"
  log "$name: $(field req_s "$line") req/s, $(field mb_s "$line") MB/s, p50 $(field p50_ms "$line") ms, p99 $(field p99_ms "$line") ms, errors $errs; server CPU $cores cores, $us_req us/request"
}

# check_range WHO URL START LEN: status 206, right length, right bytes.
check_range() {
  local who=$1 url=$2 start=$3 len=$4 got
  local end=$((start + len - 1))
  got=$(curl -s -o "$WORK/range.part" -D "$WORK/range.hdr" -w '%{http_code} %{size_download}' \
    -r "$start-$end" "$url") || true
  local cr
  cr=$(tr -d '\r' <"$WORK/range.hdr" | awk -F': ' 'tolower($1) == "content-range" { print $2 }')
  if [ "$got" != "206 $len" ]; then
    problem "$who range $start-$end: got 'status size' = '$got', want '206 $len'"
  elif [ "$cr" != "bytes $start-$end/$BIG_SIZE" ]; then
    problem "$who range $start-$end: Content-Range '$cr', want 'bytes $start-$end/$BIG_SIZE'"
  elif ! dd if="$STORE/$BIG" iflag=skip_bytes,count_bytes skip="$start" count="$len" status=none |
    cmp -s - "$WORK/range.part"; then
    problem "$who range $start-$end: body differs from the file"
  else
    log "$who range $start-$end: 206, $len bytes, Content-Range ok, bytes ok"
  fi
  rm -f "$WORK/range.part" "$WORK/range.hdr"
}

# ---------------------------------------------------------------- 3. go
: >"$WORK/wrk.log"
: >"$WORK/ferry.err"
start_nginx
start_ferry
log "ferry at $FERRY_URL (pid $FERRY_PID), nginx at $NGINX_URL (pid $NGINX_PID); $NPROC cores, $MEM_GIB GiB RAM"
F_BIG=$FERRY_URL/v1/files/$BIG
N_BIG=$NGINX_URL/$BIG

log "correctness checks"
for len in 65536 1048576; do
  start=$(((RANDOM * 32768 + RANDOM) % (BIG_SIZE - len)))
  check_range ferry "$F_BIG" "$start" "$len"
  check_range nginx "$N_BIG" "$start" "$len"
done
check_range ferry "$F_BIG" $((BIG_SIZE - 65536)) 65536 # the last 64 KiB
if curl -s -D "$WORK/full.hdr" "$F_BIG" | cmp -s - "$STORE/$BIG"; then
  log "ferry full GET: $(head -n 1 "$WORK/full.hdr" | tr -d '\r'), body identical to the file"
else
  problem "ferry full GET: '$(head -n 1 "$WORK/full.hdr" | tr -d '\r')', body differs from the file"
fi
rm -f "$WORK/full.hdr"

log "warm-up"
DURATION=2s wrk_run warmup.ferry "$F_BIG" 65536 "$WRK_CONNS"
DURATION=2s wrk_run warmup.nginx "$N_BIG" 65536 "$WRK_CONNS"

log "random ranges: wrk -t$WRK_THREADS -c$WRK_CONNS -d$DURATION, $RUNS runs"
for run in $(seq "$RUNS"); do
  # Alternate who goes first so drift on a noisy machine hits both alike.
  if ((run % 2)); then order="ferry nginx"; else order="nginx ferry"; fi
  for len in 65536 1048576; do
    for who in $order; do
      if [ "$who" = ferry ]; then
        ensure_ferry "under wrk (found dead before run $run, ${len}-byte ranges)"
        url=$F_BIG
      else
        url=$N_BIG
      fi
      wrk_run "$who.r$len" "$url" "$len" "$WRK_CONNS"
    done
  done
done
RSS_RANGES=n/a
! ferry_check "during the last range run" || RSS_RANGES=$(ferry_hwm_mib)

log "single full-file stream (curl), $FULL_RUNS runs"
for run in $(seq "$FULL_RUNS"); do
  if ((run % 2)); then order="ferry nginx"; else order="nginx ferry"; fi
  for who in $order; do
    if [ "$who" = ferry ]; then
      ensure_ferry "(found dead before full-file stream $run)"
      url=$F_BIG
    else
      url=$N_BIG
    fi
    got=$(curl -s -o /dev/null -w '%{http_code} %{size_download} %{speed_download}' "$url") || true
    read -r code size speed <<<"$got"
    if [ "$code" != 200 ] || [ "$size" != "$BIG_SIZE" ]; then
      problem "$who full GET: status $code, $size bytes (want 200, $BIG_SIZE)"
      continue
    fi
    gbs=$(awk -v s="$speed" 'BEGIN { printf "%.3f", s / 1e9 }')
    add "$who.full" "$gbs"
    log "$who full stream: $gbs GB/s"
  done
done

log "$STREAMS concurrent full-file streams: wrk -t$WRK_THREADS -c$STREAMS -d$DURATION, $RUNS runs, fresh ferry each run"
ferry_streams() {
  start_ferry
  F_BIG=$FERRY_URL/v1/files/$BIG
  add ferry.idle_rss "$(ferry_hwm_mib)"
  wrk_run ferry.streams "$F_BIG" 0 "$STREAMS"
  if ferry_check "during (or at the end of) a run of $STREAMS streams"; then
    add ferry.streams_rss "$(ferry_hwm_mib)"
    log "ferry peak RSS (VmHWM) over $STREAMS streams: $(ferry_hwm_mib) MiB"
  fi
}
for run in $(seq "$RUNS"); do
  if ((run % 2)); then
    ferry_streams
    wrk_run nginx.streams "$N_BIG" 0 "$STREAMS"
  else
    wrk_run nginx.streams "$N_BIG" 0 "$STREAMS"
    ferry_streams
  fi
done

# How ferry's peak RSS grows with the number of streams (one short run each).
RSS_SWEEP=""
for c in 25 50 100; do
  start_ferry
  DURATION=5s wrk_run "ferry.sweep$c" "$FERRY_URL/v1/files/$BIG" 0 "$c"
  ferry_check "during (or at the end of) a run of $c streams" || true
  RSS_SWEEP="$RSS_SWEEP $c streams: $(ferry_hwm_mib) MiB;"
  log "ferry peak RSS with $c streams: $(ferry_hwm_mib) MiB"
done

nginx_get_huge() {
  local got code size speed
  got=$(curl -s -o /dev/null -w '%{http_code} %{size_download} %{speed_download}' "$NGINX_URL/$HUGE") || true
  read -r code size speed <<<"$got"
  if [ "$code" != 200 ] || [ "$size" != "$HUGE_SIZE" ]; then
    problem "nginx 4 GiB GET: status $code, $size bytes"
    return
  fi
  add nginx.down_gbs "$(awk -v s="$speed" 'BEGIN { printf "%.3f", s / 1e9 }')"
  log "nginx 4 GiB GET: $(awk -v s="$speed" 'BEGIN { printf "%.3f", s / 1e9 }') GB/s"
}

log "4 GiB up and down, $RUNS runs, fresh ferry for each direction"
for i in 1 2 3 4; do cat "$STORE/$BIG"; done >"$SRC4"
# Reference for the PUT speed: ferry's local store fsyncs the file on commit,
# so the disk's write speed matters. Same bytes, same filesystem, dd + fsync.
sync
got=$(LC_ALL=C dd if="$SRC4" of="$WORK/dd.part" bs=1M conv=fsync 2>&1 | awk '/copied/ { print $(NF - 1), $NF }') || true
rm -f "$WORK/dd.part"
DD_GBS=$(awk -v v="${got% *}" -v u="${got#* }" 'BEGIN {
  if (v == "") { print "n/a"; exit }
  m = (u ~ /^GB/) ? 1 : (u ~ /^MB/) ? 1e-3 : (u ~ /^kB/) ? 1e-6 : 1e-9
  printf "%.3f\n", v * m }')
log "disk baseline: dd of 4 GiB with conv=fsync: $DD_GBS GB/s"
for run in $(seq "$RUNS"); do
  rm -f "$STORE/$HUGE"
  start_ferry
  got=$(curl -s -o "$WORK/put.body" -w '%{http_code} %{size_upload} %{speed_upload}' \
    -T "$SRC4" "$FERRY_URL/v1/files/$HUGE") || true
  read -r code size speed <<<"$got"
  up_rss=n/a
  ! ferry_check "during the 4 GiB PUT" || up_rss=$(ferry_hwm_mib)
  stored=$(stat -c %s "$STORE/$HUGE" 2>/dev/null || echo missing)
  if [ "$code" != 201 ] || [ "$stored" != "$HUGE_SIZE" ]; then
    problem "4 GiB PUT: status $code, sent $size, stored size $stored (want 201, $HUGE_SIZE): $(head -c 300 "$WORK/put.body")"
    continue
  fi
  if [ "$run" = 1 ] && ! cmp -s "$SRC4" "$STORE/$HUGE"; then
    problem "4 GiB PUT: stored file differs from what was sent"
  fi
  add ferry.up_rss "$up_rss"
  add ferry.up_gbs "$(awk -v s="$speed" 'BEGIN { printf "%.3f", s / 1e9 }')"
  log "ferry 4 GiB PUT: $code, $(awk -v s="$speed" 'BEGIN { printf "%.3f", s / 1e9 }') GB/s, peak RSS $up_rss MiB"

  # nginx GETs the same file too, for reference; who goes first alternates.
  ((run % 2)) || nginx_get_huge
  start_ferry
  got=$(curl -s -o /dev/null -w '%{http_code} %{size_download} %{speed_download}' \
    "$FERRY_URL/v1/files/$HUGE") || true
  read -r code size speed <<<"$got"
  down_rss=n/a
  ! ferry_check "during the 4 GiB GET" || down_rss=$(ferry_hwm_mib)
  if [ "$code" != 200 ] || [ "$size" != "$HUGE_SIZE" ]; then
    problem "4 GiB GET: status $code, $size bytes (want 200, $HUGE_SIZE)"
  else
    add ferry.down_rss "$down_rss"
    add ferry.down_gbs "$(awk -v s="$speed" 'BEGIN { printf "%.3f", s / 1e9 }')"
    log "ferry 4 GiB GET: $(awk -v s="$speed" 'BEGIN { printf "%.3f", s / 1e9 }') GB/s, peak RSS $down_rss MiB"
  fi
  ((run % 2 == 0)) || nginx_get_huge
done
stop_ferry
rm -f "$STORE/$HUGE" "$SRC4" "$WORK/put.body"
stop_nginx

if grep -qiE 'error|panick' "$WORK/ferry.err"; then # NO_COLOR=1 above keeps it plain text
  problem "ferry logged errors ($(grep -ciE 'error|panick' "$WORK/ferry.err") lines), first: $(grep -iE 'error|panick' "$WORK/ferry.err" | head -n 1 | cut -c1-300)"
fi

# ---------------------------------------------------------------- 7. report
verdict() { # value op target
  awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
    if (v == "n/a" || v == "") { print "**not measured**"; exit }
    ok = (op == ">=") ? (v + 0 >= t + 0) : (v + 0 < t + 0)
    print ok ? "met" : "**MISSED**" }'
}

F64R=$(med ferry.r65536.req) N64R=$(med nginx.r65536.req)
F64M=$(med ferry.r65536.mbs) N64M=$(med nginx.r65536.mbs)
F1R=$(med ferry.r1048576.req) N1R=$(med nginx.r1048576.req)
F1M=$(med ferry.r1048576.mbs) N1M=$(med nginx.r1048576.mbs)
FFULL=$(med ferry.full) NFULL=$(med nginx.full)
FSTR=$(med ferry.streams.mbs) NSTR=$(med nginx.streams.mbs)
RATIO64=$(paired ferry.r65536.req nginx.r65536.req)
RATIO64=${RATIO64%% *}
RSS_STREAMS_MAX=$(maxof ${R[ferry.streams_rss]:-} || true)
RSS_UP_MAX=$(maxof ${R[ferry.up_rss]:-} || true)
RSS_DOWN_MAX=$(maxof ${R[ferry.down_rss]:-} || true)
RSS_HUGE_MAX=$(maxof "${RSS_UP_MAX:-}" "${RSS_DOWN_MAX:-}" || true)

SECTION=$(mktemp)
{
  echo "## serve (ferry vs nginx)"
  echo
  echo "Produced by \`bench/serve.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC')."
  echo
  echo "- Machine: $NPROC cores ($CPU_MODEL), $MEM_GIB GiB RAM, Linux $(uname -r); shared and noisy."
  echo "- ferry $FERRY_REV (release build of $FERRY_BUILT, \`ferry serve --store DIR\`, local-directory store); $("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //') (\`sendfile on\`, \`access_log off\`, $NPROC workers, same directory); $(wrk -v 2>&1 | head -n 1 | awk '{ print $1, $2 }'); curl $(curl --version | awk 'NR == 1 { print $2 }')."
  echo "- Client and servers share the same $NPROC cores over loopback, so the client's CPU is part of every figure."
  echo "- Each figure is the median of $RUNS runs ($FULL_RUNS for the single stream; individual runs in brackets); ferry and nginx run back to back and take turns going first, and the ratio is taken per run. MB/s and GB/s are decimal (10^6, 10^9 bytes/s)."
  echo "- Ranges: \`wrk -t$WRK_THREADS -c$WRK_CONNS -d$DURATION\` with \`bench/ranges.lua\`, a random \`Range: bytes=a-b\` per request over a 1 GiB random file (page-cached). MB/s counts all bytes wrk read, headers included."
  echo "- Full stream: one \`curl -o /dev/null\` of the 1 GiB file. Concurrent: \`wrk -c$STREAMS -d$DURATION\` on the 1 GiB file, i.e. $STREAMS full-file streams in flight for $DURATION (few or none finish in that time); aggregate bytes/s. wrk reads 8 KiB per read(), so this aggregate is largely client-bound; the server CPU row shows what each server spent on it."
  echo "- Server CPU is utime + stime from \`/proc/PID/stat\` (nginx: master + workers) over each wrk run."
  echo "- Peak RSS is ferry's \`VmHWM\` from \`/proc/PID/status\`, ferry restarted before each measured phase (idle after start: $(med ferry.idle_rss) MiB)."
  echo
  echo "| measurement | ferry | nginx | ferry/nginx: median of per-run ratios (per run) |"
  echo "|---|---|---|---|"
  echo "| 64 KiB random ranges, req/s | $(fmt "$F64R") [$(runs_of ferry.r65536.req)] | $(fmt "$N64R") [$(runs_of nginx.r65536.req)] | $(paired ferry.r65536.req nginx.r65536.req) |"
  echo "| 64 KiB random ranges, MB/s | $(fmt "$F64M") | $(fmt "$N64M") | $(paired ferry.r65536.mbs nginx.r65536.mbs) |"
  echo "| 64 KiB random ranges, server CPU µs per request | $(fmt "$(med ferry.r65536.us_req)") ($(fmt "$(med ferry.r65536.cores)" 2) cores busy) | $(fmt "$(med nginx.r65536.us_req)") ($(fmt "$(med nginx.r65536.cores)" 2) cores busy) | $(paired ferry.r65536.us_req nginx.r65536.us_req) |"
  echo "| 1 MiB random ranges, req/s | $(fmt "$F1R") [$(runs_of ferry.r1048576.req)] | $(fmt "$N1R") [$(runs_of nginx.r1048576.req)] | $(paired ferry.r1048576.req nginx.r1048576.req) |"
  echo "| 1 MiB random ranges, MB/s | $(fmt "$F1M") | $(fmt "$N1M") | $(paired ferry.r1048576.mbs nginx.r1048576.mbs) |"
  echo "| 1 GiB single stream, GB/s | $(fmt "$FFULL" 2) [$(runs_of ferry.full)] | $(fmt "$NFULL" 2) [$(runs_of nginx.full)] | $(paired ferry.full nginx.full) |"
  echo "| $STREAMS concurrent streams, aggregate MB/s | $(fmt "$FSTR") [$(runs_of ferry.streams.mbs)] | $(fmt "$NSTR") [$(runs_of nginx.streams.mbs)] | $(paired ferry.streams.mbs nginx.streams.mbs) |"
  echo "| $STREAMS concurrent streams, server CPU cores busy | $(fmt "$(med ferry.streams.cores)" 2) | $(fmt "$(med nginx.streams.cores)" 2) | $(paired ferry.streams.cores nginx.streams.cores) |"
  echo
  echo "ferry peak RSS (VmHWM, MiB; median, max, [runs]):"
  echo
  echo "| phase | median | max | runs |"
  echo "|---|---|---|---|"
  echo "| $STREAMS concurrent 1 GiB streams | $(med ferry.streams_rss) | ${RSS_STREAMS_MAX:-n/a} | $(runs_of ferry.streams_rss) |"
  echo "| 4 GiB PUT (streamed upload, curl -T) | $(med ferry.up_rss) | ${RSS_UP_MAX:-n/a} | $(runs_of ferry.up_rss) |"
  echo "| 4 GiB GET | $(med ferry.down_rss) | ${RSS_DOWN_MAX:-n/a} | $(runs_of ferry.down_rss) |"
  echo "| range runs (one process, all range runs) | $RSS_RANGES | | |"
  echo
  echo "Peak RSS against the number of concurrent 1 GiB streams (one 5 s wrk run each, fresh ferry):${RSS_SWEEP%;}; $STREAMS streams: $(med ferry.streams_rss) MiB (above)."
  echo
  echo "4 GiB transfer speed through ferry: PUT $(fmt "$(med ferry.up_gbs)" 2) GB/s [$(runs_of ferry.up_gbs)], GET $(fmt "$(med ferry.down_gbs)" 2) GB/s [$(runs_of ferry.down_gbs)] (nginx, same file: $(fmt "$(med nginx.down_gbs)" 2) GB/s [$(runs_of nginx.down_gbs)]). Disk reference, measured once just before (the virtual disk is shared and its speed varies a lot): \`dd bs=1M conv=fsync\` of the same 4 GiB onto the same filesystem: $(fmt "$DD_GBS" 2) GB/s; ferry's local store also fsyncs the file on commit."
  echo
  echo "Targets:"
  echo
  echo "| target | measured | verdict |"
  echo "|---|---|---|"
  echo "| ≥ 0.8× nginx req/s on 64 KiB ranges | ${RATIO64}× | $(verdict "$RATIO64" ">=" 0.8) |"
  echo "| full-file stream ≥ 1 GB/s on loopback | $(fmt "$FFULL" 2) GB/s | $(verdict "$FFULL" ">=" 1) |"
  echo "| peak RSS < 100 MiB, 4 GiB up and down | ${RSS_HUGE_MAX:-n/a} MiB (max) | $(verdict "${RSS_HUGE_MAX:-n/a}" "<" 100) |"
  echo "| peak RSS < 100 MiB, $STREAMS concurrent streams | ${RSS_STREAMS_MAX:-n/a} MiB (max) | $(verdict "${RSS_STREAMS_MAX:-n/a}" "<" 100) |"
  echo
  if ((${#PROBLEMS[@]})); then
    echo "Problems seen during the run:"
    echo
    for p in "${PROBLEMS[@]}"; do echo "- $p"; done
  else
    echo "No errors: the range checks (curl, random 64 KiB and 1 MiB ranges on both servers, plus ferry's last 64 KiB) returned 206 with the right length, Content-Range and bytes; ferry's full GET of the 1 GiB file was byte-identical; every PUT returned 201 and stored exactly the bytes sent (cmp on the first run); every GET returned the full length; wrk reported no socket, status or timeout errors; ferry logged no errors."
  fi
  echo
} >"$SECTION"

# Replace the section in RESULTS.md (or append it).
[ -f "$RESULTS" ] || printf '# Benchmark results\n\n' >"$RESULTS"
awk -v secfile="$SECTION" '
  BEGIN { while ((getline l < secfile) > 0) sec = sec l "\n" }
  /^## serve \(ferry vs nginx\)/ { printf "%s", sec; skip = 1; done = 1; next }
  skip && /^## / { skip = 0 }
  !skip { print }
  END { if (!done) printf "%s", sec }
' "$RESULTS" >"$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"

echo
cat "$SECTION"
rm -f "$SECTION"
log "wrote $RESULTS; raw wrk output in $WORK/wrk.log, ferry stderr in $WORK/ferry.err"
