#!/usr/bin/env bash
# bench/ws.sh: uploads over the WebSocket (ferry.v1) vs over HTTP chunk PUTs,
# and change-feed latency from commit to subscriber. Writes the section
# "## ws (WebSocket vs HTTP chunks, change-feed latency)" of bench/RESULTS.md
# (other sections are kept as they are).
#
# 1. Waits until no other benchmark runs (bench/*.sh, wrk), and pauses before
#    any measured run while one is active or the machine is busy (compiles).
# 2. cargo build --release; runs a private copy of target/release/ferry.
# 3. 1 GiB random file, uploaded in 1 MiB chunks with PARALLEL chunks in
#    flight, by bench/ws_load.py: over one WebSocket (a minimal RFC 6455 client
#    of its own; on tmpfs also through the `websockets` library, and both
#    transports again with 4 MiB chunks) vs over
#    PARALLEL keep-alive connections of `PUT /v1/uploads/{id}/chunks/{n}`. Timed: chunk
#    transfer + complete. RUNS runs per transport, alternating which goes
#    first, on a store on disk (/tmp) and on a store on tmpfs (/dev/shm, where
#    the per-chunk fsync costs nothing and the transport is what is measured).
# 4. The same file through `ferry put --transport ws|http --parallel PARALLEL`,
#    with the server's chunk size (4 MiB for 1 GiB) and again with
#    `--chunk-size 1M` (the target's setting); the CLI hashes the file as it
#    reads the chunks. PUT_RUNS runs each, on both stores.
# 5. Change-feed latency (disk store): EVENTS sequential small PUTs with a WS
#    `watch` subscriber, then again with an SSE (`GET /v1/events`) subscriber,
#    paced (PACE_MS between PUTs) and back to back; per PUT, event arrival
#    minus PUT response (and minus PUT sent), one process, one monotonic clock.
#
# Knobs (environment): SIZE_MIB (1024), RUNS (5), PUT_RUNS (3), PARALLEL (4),
# EVENTS (500), PACE_MS (5), SKIP_BUILD=1, SKIP_WAIT=1, WS_BENCH_DIR
# (/tmp/ferry-ws-bench), WS_BENCH_SHM (/dev/shm/ferry-ws-bench),
# WS_BENCH_VENV (/tmp/ferry-ws-venv, used only when python3 lacks the
# `websockets` and `crc32c` packages), NO_RESULTS=1 (print, don't write).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
WORK=${WS_BENCH_DIR:-/tmp/ferry-ws-bench}
SHM=${WS_BENCH_SHM:-/dev/shm/ferry-ws-bench}
VENV=${WS_BENCH_VENV:-/tmp/ferry-ws-venv}
SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-5}
PUT_RUNS=${PUT_RUNS:-3}
PARALLEL=${PARALLEL:-4}
EVENTS=${EVENTS:-500}
PACE_MS=${PACE_MS:-5}
CHUNK=1048576

log() { printf '[ws.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

SERVER_PID=
WATCH_PID=
cleanup() {
  local rc=$?
  [[ -n $WATCH_PID ]] && kill "$WATCH_PID" 2>/dev/null || true
  if [[ -n $SERVER_PID ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  # Stores and the binary go; logs and results stay in $WORK/run for a look.
  rm -rf "$SHM" "$WORK/run/store" "$WORK/run/ferry" "${NOISE_FILE:-}"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ quiet
# Other benchmarks: any bench/*.sh but this one (serve.sh, upload.sh,
# mount-read.sh, ...), and wrk. Those idle in their own wait loops (only
# `sleep` children) do not count: several scripts waiting for each other would
# otherwise all wait out their whole limit.
OTHERS='bench/serve\.sh|bench/upload\.sh|wrk|bench/[A-Za-z0-9_.-]+\.sh'
others_list() {
  pgrep -af -- "$OTHERS" 2>/dev/null | grep -v -e 'bench/ws\.sh' -e "^$$ " -e "^$BASHPID " | cut -c1-100 || true
}
# A benchmark whose only child processes are `sleep`s is sitting in its own
# wait loop (waiting for others, maybe for us): it loads nothing.
waiting_only() { # PID
  local kids; kids=$(pgrep -P "$1" -a 2>/dev/null | cut -d' ' -f2 || true)
  [[ -n $kids ]] && ! grep -qv '^sleep$' <<< "$kids"
}
busy_others() { # the other benchmarks that are doing something, one per line
  local line pid
  others_list | while read -r line; do
    pid=${line%% *}
    waiting_only "$pid" || printf '%s\n' "$line"
  done
}
others_running() { # twice, 3 s apart: a waiting loop is between sleeps only briefly
  [[ -n $(busy_others) ]] && return 0
  sleep 3
  [[ -n $(busy_others) ]]
}
NOISE_FILE=$(mktemp)
NOISE_CHECKS=0
# Before each measured run: wait up to QUIET_MAX s (default 60) until the
# machine's CPU use, over 2 s, is below QUIET_CORES (0.5) cores: compiles come
# and go on this shared machine. Runs that started anyway are counted.
QUIET_MAX=${QUIET_MAX:-60}
QUIET_CORES=${QUIET_CORES:-0.5}
NOT_QUIET=0
busy_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
quiet_before_run() {
  local start=$SECONDS b0 b1
  while :; do
    b0=$(busy_ticks); sleep 2; b1=$(busy_ticks)
    awk -v d=$((b1 - b0)) -v hz="$(getconf CLK_TCK)" -v lim="$QUIET_CORES" \
      'BEGIN { exit !(d / hz / 2 < lim) }' && return 0
    if (( SECONDS - start >= QUIET_MAX )); then
      NOT_QUIET=$((NOT_QUIET + 1))
      return 0
    fi
  done
}
# Another benchmark that becomes active mid-way (its own wait ran out) is
# waited for too, up to MIDRUN_WAIT s in all (default 1800).
MIDRUN_WAIT=${MIDRUN_WAIT:-1800}
MIDRUN_WAITED=0
wait_others_midrun() {
  [[ ${SKIP_WAIT:-0} == 1 ]] && return 0
  local logged=0
  while (( MIDRUN_WAITED < MIDRUN_WAIT )) && others_running; do
    (( logged )) || log "pausing: another benchmark is active: $(busy_others | tr '\n' ';')"
    logged=1
    sleep 20
    MIDRUN_WAITED=$((MIDRUN_WAITED + 23))
  done
  (( logged )) && log "resuming"
  return 0
}
note_noise() { # records other benchmarks and compilers busy right now
  wait_others_midrun
  quiet_before_run
  NOISE_CHECKS=$((NOISE_CHECKS + 1))
  local line pid
  {
    while read -r line; do
      [[ -z $line ]] && continue
      pid=${line%% *}
      if waiting_only "$pid"; then
        printf '%s (idle in its wait loop)\n' "${line#* }"
      else
        printf '%s (active)\n' "${line#* }"
      fi
    done <<< "$(others_list)"
    pgrep -a rustc 2>/dev/null | grep -o -- '--crate-name [A-Za-z0-9_]*' \
      | sed 's/--crate-name /rustc (compiling /; s/$/)/' || true
  } | sort -u >> "$NOISE_FILE"
}
WAITED_NOTE=""
wait_quiet() {
  [[ ${SKIP_WAIT:-0} == 1 ]] && return 0
  local start=$SECONDS
  while others_running; do
    if (( SECONDS - start >= 2400 )); then
      WAITED_NOTE="other benchmarks were still running after 40 minutes of waiting: $(busy_others | tr '\n' ';' | cut -c1-300)"
      log "$WAITED_NOTE; measuring anyway"
      return 0
    fi
    log "waiting for other benchmarks to finish: $(busy_others | tr '\n' ';')"
    sleep 20
  done
  (( SECONDS - start > 0 )) && log "quiet after $((SECONDS - start)) s"
  return 0
}

wait_quiet

# ------------------------------------------------------------------ build
mkdir -p "$WORK"
rm -rf "$WORK/run" "$SHM"
mkdir -p "$WORK/run" "$SHM"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "cargo build --release (may wait for the cargo lock)"
  (cd "$ROOT" && cargo build --release --bin ferry) || die "cargo build --release failed"
fi
# A private copy: a concurrent build must not swap the binary mid-run.
FERRY=$WORK/run/ferry
cp "$TARGET_DIR/release/ferry" "$FERRY"

# ------------------------------------------------------------------ python
PY=python3
if ! "$PY" -c 'import websockets, crc32c' 2>/dev/null; then
  if ! "$VENV/bin/python" -c 'import websockets, crc32c' 2>/dev/null; then
    log "creating $VENV with websockets and crc32c from PyPI"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet websockets crc32c
  fi
  PY=$VENV/bin/python
fi
"$PY" -c 'import websockets; from websockets.asyncio.client import connect' \
  || die "the websockets package is too old (need >= 13)"

# ------------------------------------------------------------------ data
DATA=$WORK/data-${SIZE_MIB}m.bin
if [[ ! -f $DATA || $(stat -c %s "$DATA") -ne $((SIZE_MIB * 1048576)) ]]; then
  log "writing $SIZE_MIB MiB of random data to $DATA"
  head -c $((SIZE_MIB * 1048576)) /dev/urandom > "$DATA.tmp"
  mv "$DATA.tmp" "$DATA"
fi
cat "$DATA" > /dev/null # into the page cache

RESULTS=$WORK/run/results.jsonl
PROBLEMS=$WORK/run/problems.txt
: > "$RESULTS"
: > "$PROBLEMS"
problem() { log "problem: $*"; printf '%s\n' "$*" >> "$PROBLEMS"; }
json_str() { "$PY" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", b - a }'; } # B - A
cpu_of() { # utime+stime ticks of a pid
  awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# ------------------------------------------------------------------ server
URL=
start_server() { # STORE_DIR LABEL
  local store=$1 label=$2 logf=$WORK/run/serve-$2.log
  rm -rf "$store"; mkdir -p "$store"
  "$FERRY" serve --store "$store" --listen 127.0.0.1:0 > "$logf" 2>&1 &
  SERVER_PID=$!
  local i
  for i in $(seq 1 300); do
    URL=$(grep -o 'ferry serving .* at http://[0-9.:]*' "$logf" 2>/dev/null | grep -o 'http://[0-9.:]*' | head -1 || true)
    [[ -n $URL ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "ferry serve exited: $(tail -5 "$logf")"
    sleep 0.1
  done
  [[ -n $URL ]] || die "ferry serve did not say it was ready within 30 s"
  curl -fsS "$URL/healthz" > /dev/null || die "healthz failed at $URL"
  log "ferry serving $store ($label) at $URL, pid $SERVER_PID"
}
stop_server() { # LABEL
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    problem "ferry serve ($1) had died before the end of its phase: $(tail -3 "$WORK/run/serve-$1.log" | tr '\n' ' ')"
  fi
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
delete_remote() { curl -s -o /dev/null -X DELETE "$URL/v1/files/$1" || true; }

# ------------------------------------------------------------------ uploads
upload_runs() { # LABEL [extra]: with "extra", also WS through the websockets
  # library client, and both transports with 4 MiB chunks
  local label=$1 r t out
  local variants=(ws http)
  [[ ${2:-} == extra ]] && variants+=(wslib ws4m http4m)
  local nv=${#variants[@]}
  for r in $(seq 1 "$RUNS"); do
    local order=() k
    for k in $(seq 0 $((nv - 1))); do # a different variant goes first each run
      order+=("${variants[$(( (k + r - 1) % nv ))]}")
    done
    for t in "${order[@]}"; do
      local targs=(--transport "$t" --chunk-size $CHUNK)
      case $t in
        ws) targs=(--transport ws --ws-client raw --chunk-size $CHUNK) ;;
        wslib) targs=(--transport ws --ws-client lib --chunk-size $CHUNK) ;;
        ws4m) targs=(--transport ws --ws-client raw --chunk-size $((4 * CHUNK))) ;;
        http4m) targs=(--transport http --chunk-size $((4 * CHUNK))) ;;
      esac
      note_noise
      sync
      if out=$(timeout 900 "$PY" "$BENCH/ws_load.py" upload --server "$URL" --file "$DATA" \
            --remote "wsbench/up-$t.bin" "${targs[@]}" \
            --parallel "$PARALLEL" --server-pid "$SERVER_PID" 2> "$WORK/run/up-$label-$t-$r.err"); then
        echo "{\"kind\":\"upload\",\"store\":\"$label\",\"run\":$r,\"variant\":\"$t\",\"result\":$out}" >> "$RESULTS"
        log "$label run $r $t: $("$PY" -c 'import json,sys; r=json.loads(sys.argv[1]); print("%.0f MB/s (%.2f s)" % (r["mb_s"], r["total_s"]))' "$out")"
      else
        local err; err=$(tail -3 "$WORK/run/up-$label-$t-$r.err" | tr '\n' ' ')
        problem "$label run $r: 1 MiB-chunk upload over $t failed: $err"
        echo "{\"kind\":\"upload\",\"store\":\"$label\",\"run\":$r,\"variant\":\"$t\",\"error\":$(json_str "$err")}" >> "$RESULTS"
      fi
      delete_remote "wsbench/up-$t.bin"
    done
  done
}

put_runs() { # LABEL
  local label=$1 r t cs
  for cs in auto 1M; do
    local chunk_args=()
    [[ $cs != auto ]] && chunk_args=(--chunk-size "$cs")
    for r in $(seq 1 "$PUT_RUNS"); do
      local order=(ws http)
      (( r % 2 == 0 )) && order=(http ws)
      for t in "${order[@]}"; do
        sync
        local state=$WORK/run/state-$label-$cs-$t-$r logf=$WORK/run/put-$label-$cs-$t-$r.log
        rm -rf "$state"; mkdir -p "$state"
        note_noise
        local c0 c1 t0 t1 rc=0
        c0=$(cpu_of "$SERVER_PID"); t0=$(date +%s.%N)
        FERRY_STATE_DIR=$state timeout 900 "$FERRY" put "$DATA" "wsbench/put-$t.bin" \
          --server "$URL" --transport "$t" --parallel "$PARALLEL" "${chunk_args[@]}" > "$logf" 2>&1 || rc=$?
        t1=$(date +%s.%N); c1=$(cpu_of "$SERVER_PID")
        local size
        size=$(curl -s "$URL/v1/stat/wsbench/put-$t.bin" | jq -r '.size // empty' 2>/dev/null || true)
        if [[ $rc -ne 0 || $size != $((SIZE_MIB * 1048576)) ]]; then
          problem "$label run $r: ferry put --transport $t (chunks: $cs) exit $rc, remote size '${size}': $(tail -3 "$logf" | tr '\n' ' ' | cut -c1-300)"
          echo "{\"kind\":\"put\",\"store\":\"$label\",\"chunk\":\"$cs\",\"run\":$r,\"transport\":\"$t\",\"error\":true}" >> "$RESULTS"
        else
          local secs
          secs=$(sub "$t0" "$t1")
          local cpu; cpu=$(awk -v a="$c0" -v b="$c1" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", (b - a) / hz }')
          echo "{\"kind\":\"put\",\"store\":\"$label\",\"chunk\":\"$cs\",\"run\":$r,\"transport\":\"$t\",\"seconds\":$secs,\"server_cpu_s\":$cpu,\"bytes\":$((SIZE_MIB * 1048576))}" >> "$RESULTS"
          log "$label ferry put (chunks: $cs) run $r $t: $(printf '%.2f' "$secs") s"
        fi
        delete_remote "wsbench/put-$t.bin"
      done
    done
  done
}

# ------------------------------------------------------------------ events
event_runs() { # LABEL
  local label=$1 via out pace
  for pace in "$PACE_MS" 0; do
    for via in ws sse; do
      note_noise
      local err_f=$WORK/run/events-$label-$via-$pace.err
      if out=$(timeout 900 "$PY" "$BENCH/ws_load.py" events --server "$URL" --via "$via" \
            --count "$EVENTS" --pace-ms "$pace" --prefix "wsbench-ev-$via-$pace" 2> "$err_f"); then
        echo "{\"kind\":\"events\",\"server\":\"$label\",\"pace_ms\":$pace,\"result\":$out}" >> "$RESULTS"
        log "$label events via $via, pace $pace ms: $("$PY" -c 'import json,sys; r=json.loads(sys.argv[1]); a=sorted(s["after_resp_ms"] for s in r["samples"] if "after_resp_ms" in s); print("p50 %.2f ms, max %.2f ms, %d missing" % (a[len(a)//2], a[-1], r["missing"]))' "$out")"
      else
        local err; err=$(tail -3 "$err_f" | tr '\n' ' ')
        problem "$label: event latency via $via (pace $pace ms) failed: $err"
        echo "{\"kind\":\"events\",\"server\":\"$label\",\"pace_ms\":$pace,\"via\":\"$via\",\"error\":$(json_str "$err")}" >> "$RESULTS"
      fi
    done
  done
}

watch_cli_check() {
  # Functional check of the CLI subscriber (not timed): `ferry watch`.
  local wout=$WORK/run/watch.out
  "$FERRY" watch wsbench-cli --server "$URL" > "$wout" 2> "$WORK/run/watch.err" &
  WATCH_PID=$!
  sleep 1
  local i
  for i in 1 2 3; do
    curl -s -o /dev/null -T /dev/null "$URL/v1/files/wsbench-cli/f$i" || true
  done
  sleep 1
  kill "$WATCH_PID" 2>/dev/null || true
  wait "$WATCH_PID" 2>/dev/null || true
  WATCH_PID=
  local lines; lines=$(grep -c '"path"' "$wout" || true)
  echo "{\"kind\":\"watch_cli\",\"puts\":3,\"lines\":${lines:-0}}" >> "$RESULTS"
  [[ ${lines:-0} -eq 3 ]] || problem "ferry watch printed ${lines:-0} change lines for 3 PUTs: $(head -c 300 "$wout") $(head -c 300 "$WORK/run/watch.err")"
}

# ------------------------------------------------------------------ run
wait_quiet
START_UTC=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
SHA_T0=$(date +%s.%N); sha256sum "$DATA" > /dev/null; SHA_T1=$(date +%s.%N)
echo "{\"kind\":\"sha256sum\",\"seconds\":$(sub "$SHA_T0" "$SHA_T1")}" >> "$RESULTS"

start_server "$WORK/run/store" disk
upload_runs disk
put_runs disk
event_runs disk
watch_cli_check
stop_server disk

start_server "$SHM/store" tmpfs
upload_runs tmpfs extra
put_runs tmpfs
stop_server tmpfs

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
NOISE=$(grep -v '^$' "$NOISE_FILE" | sort | uniq -c | sort -rn | awk '{c=$1; $1=""; printf "%s%s (at %d of the checks)", (NR>1 ? "; " : ""), substr($0,2), c}' || true)
CHECKS=$NOISE_CHECKS

# ------------------------------------------------------------------ report
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
MEM=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(cd "$ROOT" && git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
  REV="$REV+uncommitted changes in src/"
fi
export WS_START="$START_UTC" WS_MACHINE="$(nproc) cores ($CPU_MODEL), $MEM RAM, Linux $(uname -r); shared and noisy" \
  WS_REV="$REV" WS_PY="$("$PY" --version 2>&1), websockets $("$PY" -c 'import websockets; print(websockets.__version__)'), crc32c $("$PY" -c 'import importlib.metadata as m; print(m.version("crc32c"))')" \
  WS_SIZE_MIB=$SIZE_MIB WS_RUNS=$RUNS WS_PUT_RUNS=$PUT_RUNS WS_PARALLEL=$PARALLEL WS_EVENTS=$EVENTS \
  WS_PACE_MS=$PACE_MS WS_WAITED="$WAITED_NOTE" WS_LOAD="$LOAD_START → $LOAD_END" \
  WS_NOISE="$NOISE" WS_CHECKS="$CHECKS" WS_MIDRUN="$MIDRUN_WAITED" WS_NOT_QUIET="$NOT_QUIET" WS_QUIET="$QUIET_CORES cores, $QUIET_MAX s" WS_DISK_STORE="$WORK/run/store" WS_SHM_STORE="$SHM/store"
SECTION=$WORK/section.md
"$PY" "$BENCH/ws_report.py" "$RESULTS" "$PROBLEMS" > "$SECTION"
cp "$RESULTS" "$WORK/results.jsonl"
cat "$SECTION"
if [[ ${NO_RESULTS:-0} != 1 ]]; then
  "$PY" "$BENCH/ws_report.py" --splice "$BENCH/RESULTS.md" "$SECTION"
  log "wrote the ws section of $BENCH/RESULTS.md"
fi
