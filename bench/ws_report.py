#!/usr/bin/env python3
"""Summarises bench/ws.sh results into the RESULTS.md section.

  ws_report.py RESULTS.jsonl PROBLEMS.txt > section.md   (context from WS_* env)
  ws_report.py --splice bench/RESULTS.md section.md
      replaces the section "## ws (...)" (up to the next "## " heading) or
      appends it; every other section stays as it is.
"""

import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_md import splice as splice_section  # noqa: E402

HEADING = "## ws (WebSocket vs HTTP chunks, change-feed latency)"
STORES = ("disk", "tmpfs")
LABELS = {"disk": "disk", "tmpfs": "tmpfs"}
GIB = 1 << 30


def pct(values, p):
    """Nearest-rank percentile."""
    v = sorted(values)
    if not v:
        return math.nan
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]


def med(values):
    return statistics.median(values) if values else math.nan


def f(x, nd=0):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def runs_list(values, nd=0):
    return " ".join(f(v, nd) for v in values)


def splice(results_md, section_md):
    splice_section(results_md, open(section_md).read(), HEADING)


def report(results_path, problems_path):
    rows = [json.loads(l) for l in open(results_path) if l.strip()]
    problems = [l.rstrip("\n") for l in open(problems_path) if l.strip()]
    env = os.environ.get
    size_mib = int(env("WS_SIZE_MIB", "1024"))
    parallel = env("WS_PARALLEL", "4")
    out = []
    w = out.append

    w(HEADING)
    w("")
    w(f"Produced by `bench/ws.sh` (helpers `bench/ws_load.py`, `bench/ws_report.py`) "
      f"on {env('WS_START', '?')}.")
    w("")
    w(f"- Machine: {env('WS_MACHINE', '?')}.")
    w(f"- ferry {env('WS_REV', '?')} (release build, `ferry serve --store DIR --listen 127.0.0.1:0`, "
      f"local-directory store); client: {env('WS_PY', '?')}.")
    w(f"- Before each measured run the script pauses while another benchmark is active "
      f"(paused {env('WS_MIDRUN', '?')} s in all this time), then waits (up to "
      f"{env('WS_QUIET', '?').split(', ')[-1]}) "
      f"until the machine's CPU use over 2 s is below {env('WS_QUIET', '?').split(', ')[0]}; "
      f"{env('WS_NOT_QUIET', '?')} of {env('WS_CHECKS', '?')} runs started without that quiet. "
      f"Other processes seen at those checks: {env('WS_NOISE') or 'none'}. "
      f"Load average (1, 5, 15 min) at start → end: {env('WS_LOAD', '?')}.")
    if env("WS_WAITED"):
        w(f"- Caution: {env('WS_WAITED')}.")
    w("- Client and server share the same 2 cores over loopback, so the client's CPU is part of "
      "every figure. MB/s is decimal (10^6 bytes/s).")
    w(f"- **1 MiB chunks** (the target's setting): one {size_mib} MiB random file (held in the "
      f"client's memory, CRC32Cs computed beforehand), an upload session created with "
      f"`chunk_size` 1048576 ({size_mib} chunks), {parallel} chunks in flight. WS: one "
      f"connection (`upload.create`, binary frames, a chunk in flight from its frame until its "
      f"`ack`, `upload.complete`), through a minimal RFC 6455 client in `bench/ws_load.py` "
      f"(fresh random mask per frame, masking in C, header and payload written without "
      f"joining them), so that the client costs about as little per byte as the HTTP one; on "
      f"tmpfs also through the `websockets` library's client, whose framing costs ~1 ms of "
      f"client CPU per MiB. HTTP: {parallel} keep-alive connections, each with one "
      f"`PUT /v1/uploads/{{id}}/chunks/{{n}}` (`X-Ferry-Crc32c`) outstanding, then "
      f"`POST …/complete`. Both clients run on Python asyncio in one thread; timed: first chunk sent → commit answered (session creation "
      f"excluded). {env('WS_RUNS', '?')} runs per transport, a different one going first each "
      f"run; the "
      f"ratio is WS/HTTP throughput taken per run, and its median is reported.")
    w(f"- Two stores: **disk** = `{env('WS_DISK_STORE', '/tmp/…')}` on the VM's virtual disk "
      f"(the local store `fdatasync`s every chunk before acknowledging it, so this is largely "
      f"disk-bound), and **tmpfs** = `{env('WS_SHM_STORE', '/dev/shm/…')}` (fsync is free; "
      f"what remains is the transport, the server's and the client's CPU).")
    w(f"- **`ferry put`**: the CLI, `ferry put FILE REMOTE --transport ws|http --parallel "
      f"{parallel}`, fresh `FERRY_STATE_DIR` per run, wall time of the whole command. It "
      f"hashes the file (SHA-256) as it reads the chunks, and runs twice over: with the "
      f"server's chunk size (4 MiB for 1 GiB: 256 chunks) and with `--chunk-size 1M` (the "
      f"target's setting); the server verifies the SHA-256 at commit. "
      f"{env('WS_PUT_RUNS', '?')} runs per transport and chunk size, alternating.")
    w(f"- **Change feed**: one client process subscribes (WS `watch` on its own connection, or "
      f"`GET /v1/events` SSE), then makes {env('WS_EVENTS', '?')} `PUT /v1/files/…` of 100 "
      f"bytes one after another on one keep-alive connection, waiting for each change event "
      f"(2 s timeout), then {env('WS_PACE_MS', '?')} ms before the next PUT (\"paced\"), "
      f"and again with no pause (\"back to back\"); on the disk store. Per PUT, on one "
      f"monotonic clock (`time.perf_counter`): **event − PUT response** (the figure the target "
      f"is judged on; the server publishes the change at commit, before it writes the "
      f"response, so this can be negative) and **event − PUT sent** (an upper bound on "
      f"commit → subscriber: it also contains the PUT's own work and its fsync). Percentiles "
      f"are nearest-rank.")
    w("")

    # ---------------------------------------------------------- 1 MiB chunks
    ups = [r for r in rows if r["kind"] == "upload"]
    verdict_rows = []

    def series(store, variant, key):
        d = {}
        for r in ups:
            res = r.get("result")
            if r["store"] == store and res and r.get("variant", res["transport"]) == variant:
                d[r["run"]] = res[key]
        return d

    w(f"Uploads of the {size_mib} MiB file in 1 MiB chunks, {parallel} in flight "
      f"(median [runs]):")
    w("")
    w("| store | WS MB/s | HTTP MB/s | WS/HTTP (per run) | server CPU s per GiB, WS / HTTP "
      "| client CPU s per GiB, WS / HTTP | WS through the `websockets` library: MB/s, ÷ HTTP "
      "(per run), client CPU s per GiB |")
    w("|---|---|---|---|---|---|---|")
    ratio_by_store = {}
    gib = size_mib / 1024
    for store in STORES:
        ws, ht = series(store, "ws", "mb_s"), series(store, "http", "mb_s")
        if not ws and not ht:
            continue
        ratios = [ws[k] / ht[k] for k in sorted(ws) if k in ht]
        ratio_by_store[store] = (med(ratios), ratios)
        scpu = {t: [v / gib for v in series(store, t, "server_cpu_s").values() if v is not None]
                for t in ("ws", "http")}
        ccpu = {t: [v / gib for v in series(store, t, "client_cpu_s").values()]
                for t in ("ws", "http", "wslib")}
        lib = series(store, "wslib", "mb_s")
        if lib:
            lr = [lib[k] / ht[k] for k in sorted(lib) if k in ht]
            libcell = (f"{f(med(list(lib.values())))} [{runs_list([lib[k] for k in sorted(lib)])}], "
                       f"{f(med(lr), 2)} ({runs_list(lr, 2)}), {f(med(ccpu['wslib']), 2)}")
        else:
            libcell = "not run"
        w(f"| {LABELS[store]} | {f(med(list(ws.values())))} [{runs_list([ws[k] for k in sorted(ws)])}] "
          f"| {f(med(list(ht.values())))} [{runs_list([ht[k] for k in sorted(ht)])}] "
          f"| **{f(med(ratios), 2)}** ({runs_list(ratios, 2)}) "
          f"| {f(med(scpu['ws']), 2)} / {f(med(scpu['http']), 2)} "
          f"| {f(med(ccpu['ws']), 2)} / {f(med(ccpu['http']), 2)} | {libcell} |")
    w("")
    ws4, ht4 = series("tmpfs", "ws4m", "mb_s"), series("tmpfs", "http4m", "mb_s")
    if ws4 and ht4:
        r4 = [ws4[k] / ht4[k] for k in sorted(ws4) if k in ht4]
        c4 = {t: [v / gib for v in series("tmpfs", t, "server_cpu_s").values() if v is not None]
              for t in ("ws4m", "http4m")}
        w(f"Same on tmpfs with **4 MiB chunks** (the size the server picks for 1 GiB, so what "
          f"`ferry put` uses): WS {f(med(list(ws4.values())))} MB/s "
          f"[{runs_list([ws4[k] for k in sorted(ws4)])}], HTTP {f(med(list(ht4.values())))} MB/s "
          f"[{runs_list([ht4[k] for k in sorted(ht4)])}], WS/HTTP **{f(med(r4), 2)}** "
          f"({runs_list(r4, 2)}); server CPU s per GiB, WS / HTTP: "
          f"{f(med(c4['ws4m']), 2)} / {f(med(c4['http4m']), 2)}.")
        w("")
    comp = {}
    for store in STORES:
        for t in ("ws", "http", "wslib", "ws4m", "http4m"):
            c = series(store, t, "complete_s")
            if c:
                comp[(store, t)] = med(list(c.values()))
    if comp:
        w("Of which `upload.complete` / `POST …/complete` (commit) took, median: " + "; ".join(
            f"{s} {t} {v * 1000:.1f} ms" for (s, t), v in comp.items()) + ".")
        w("")

    # ---------------------------------------------------------- ferry put
    puts = [r for r in rows if r["kind"] == "put"]
    if puts:
        w(f"`ferry put` of the same file, `--parallel {parallel}`, with the server's chunk size "
          f"(4 MiB) and with `--chunk-size 1M` (wall time includes hashing; median [runs]):")
        w("")
        w("| store | chunks | WS s | HTTP s | WS MB/s | HTTP MB/s | WS/HTTP throughput (per run) "
          "| server CPU s, WS / HTTP |")
        w("|---|---|---|---|---|---|---|---|")
        chunk_labels = {"auto": "server's (4 MiB)", "1M": "`--chunk-size 1M`"}
        for store in STORES:
            for chunk in chunk_labels:
                # Rows of runs before the chunk column was added are the server's choice.
                d = {t: {r["run"]: r for r in puts if r["store"] == store
                         and r.get("chunk", "auto") == chunk and r["transport"] == t
                         and "seconds" in r} for t in ("ws", "http")}
                if not d["ws"] and not d["http"]:
                    continue
                secs = {t: [d[t][k]["seconds"] for k in sorted(d[t])] for t in d}
                mbs = {t: [d[t][k]["bytes"] / d[t][k]["seconds"] / 1e6 for k in sorted(d[t])]
                       for t in d}
                ratios = [d["http"][k]["seconds"] / d["ws"][k]["seconds"]
                          for k in sorted(d["ws"]) if k in d["http"]]
                cpu = {t: med([d[t][k]["server_cpu_s"] for k in d[t]]) for t in d}
                w(f"| {LABELS[store]} | {chunk_labels[chunk]} "
                  f"| {f(med(secs['ws']), 2)} [{runs_list(secs['ws'], 2)}] "
                  f"| {f(med(secs['http']), 2)} [{runs_list(secs['http'], 2)}] "
                  f"| {f(med(mbs['ws']))} | {f(med(mbs['http']))} "
                  f"| {f(med(ratios), 2)} ({runs_list(ratios, 2)}) "
                  f"| {f(cpu['ws'], 1)} / {f(cpu['http'], 1)} |")
        sha = [r for r in rows if r["kind"] == "sha256sum"]
        if sha:
            w("")
            w(f"For scale: `sha256sum` of the file took {sha[0]['seconds']:.2f} s here.")
        w("")

    # ---------------------------------------------------------- events
    evs = [r for r in rows if r["kind"] == "events"]
    ev_stats = {}
    if evs:
        w("Change-feed latency, ms (nearest-rank percentiles over the PUTs whose event arrived):")
        w("")
        w("| server | subscriber | PUTs | events missing | event − PUT response p50 / p99 / max "
          "| event before response | event − PUT sent p50 / p99 / max | PUT round trip p50 / p99 |")
        w("|---|---|---|---|---|---|---|---|")
        for r in evs:
            res = r.get("result")
            pace = r.get("pace_ms", 0)
            how = f"{pace:g} ms apart" if pace else "back to back"
            server = LABELS.get(r.get("server", "disk"), r.get("server"))
            if not res:
                w(f"| {server} | {r.get('via')}, {how} | failed | | | | | |")
                ev_stats[(r.get("server"), r.get("via"), pace)] = (math.nan, None, 0)
                continue
            got = [s for s in res["samples"] if not s.get("missing")]
            a = [s["after_resp_ms"] for s in got]
            b = [s["after_send_ms"] for s in got]
            p = [s["put_ms"] for s in res["samples"]]
            neg = sum(1 for x in a if x < 0)
            label = ("WS `watch`" if res["via"] == "ws" else "SSE `/v1/events`") + f", {how}"
            ev_stats[(r.get("server", "disk"), res["via"], pace)] = (
                pct(a, 99), res["missing"], len(res["samples"]))
            w(f"| {server} | {label} | {len(res['samples'])} | {res['missing']} "
              f"| {f(pct(a, 50), 2)} / {f(pct(a, 99), 2)} / {f(max(a) if a else math.nan, 2)} "
              f"| {neg} "
              f"| {f(pct(b, 50), 2)} / {f(pct(b, 99), 2)} / {f(max(b) if b else math.nan, 2)} "
              f"| {f(pct(p, 50), 2)} / {f(pct(p, 99), 2)} |")
            if res.get("other_count"):
                problems.append(f"{res['via']} subscriber got {res['other_count']} non-change "
                                f"messages, e.g. {json.dumps(res['other'][:2])}")
        w("")
    cli = [r for r in rows if r["kind"] == "watch_cli"]
    if cli:
        w(f"`ferry watch` (CLI) check: {cli[0]['lines']} change lines printed for "
          f"{cli[0]['puts']} PUTs.")
        w("")

    # ---------------------------------------------------------- targets
    verdicts = []

    def verdict(value, ok, name=None):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            v = "**not measured**"
        else:
            v = "met" if ok else "**missed**"
        verdicts.append((name, v.strip("*")))
        return v

    w("Targets:")
    w("")
    w("| target | measured | verdict |")
    w("|---|---|---|")

    for store in ("disk", "tmpfs"):
        if store in ratio_by_store:
            r, runs = ratio_by_store[store]
            w(f"| WS ≥ 1.2× HTTP chunk PUTs, 1 MiB chunks ({store} store) | {f(r, 2)}× "
              f"(runs {runs_list(runs, 2)}) | {verdict(r, r >= 1.2, f'WS ≥ 1.2× HTTP ({store} store)')} |")
        else:
            w(f"| WS ≥ 1.2× HTTP chunk PUTs, 1 MiB chunks ({store} store) | n/a | "
              f"{verdict(None, False, f'WS ≥ 1.2× HTTP ({store} store)')} |")
    for (server, via, pace), (p99, missing, n) in ev_stats.items():
        if server != "disk":
            continue
        how = f"{pace:g} ms apart" if pace else "back to back"
        label = f"{'WS watch' if via == 'ws' else 'SSE'}, {how}"
        ok = p99 < 50 and not missing
        extra = f", {missing} of {n} events missing" if missing else ""
        w(f"| event p99 < 50 ms on loopback ({label}; event − PUT response) "
          f"| {f(p99, 2)} ms{extra} | {verdict(p99, ok, f'event p99 < 50 ms ({label})')} |")
    if not any(k[0] == "disk" for k in ev_stats):
        w(f"| event p99 < 50 ms on loopback | n/a | {verdict(None, False, 'event p99 < 50 ms')} |")
    w("")
    named = [(n, v) for n, v in verdicts if n]
    if named:
        parts = []
        for word in ("met", "missed", "not measured"):
            names = [n for n, v in named if v == word]
            if names:
                parts.append(f"{word}: " + "; ".join(names))
        w("In short — " + ". ".join(parts) + ".")
        w("")
    if problems:
        w("Problems seen during the run:")
        w("")
        for p in problems:
            w(f"- {p}")
    else:
        w("No errors, crashes or missing events during the run.")
    w("")
    return "\n".join(out)


def main():
    if sys.argv[1] == "--splice":
        splice(sys.argv[2], sys.argv[3])
    else:
        sys.stdout.write(report(sys.argv[1], sys.argv[2]))


if __name__ == "__main__":
    main()
