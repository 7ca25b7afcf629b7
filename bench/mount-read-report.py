#!/usr/bin/env python3
"""Markdown section for bench/mount-read.sh, and splicing it into RESULTS.md.

    mount-read-report.py RAW.tsv META.env PROBLEMS.txt NOTES.txt  > section.md
    mount-read-report.py --splice RESULTS.md section.md

RAW.tsv lines: round, client, metric, value (tab separated).
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_md import splice as splice_section  # noqa: E402

HEADER = "## mount-read (ferry mount vs rclone mount, httpdirfs, local disk)"

NAMES = {
    "local": "local disk",
    "ferry": "ferry mount",
    "rclone-off": "rclone mount, cache off",
    "rclone-full": "rclone mount, cache full",
    "httpdirfs": "httpdirfs",
}

# metric, label, unit decimals, higher is better
ROWS = [
    ("seq_cold", "cold sequential read, MB/s", 0, True),
    ("seq_cold_mib", "… MiB read by the cold sequential run (stopped at the time limit if < the file)", 0, True),
    ("seq_warm", "warm re-read, MB/s", 0, True),
    ("seq_warm_mib", "… MiB read by the warm re-read", 0, True),
    ("rand_p50", "random 64 KiB QD1, cold, p50 µs", 0, False),
    ("rand_p99", "random 64 KiB QD1, cold, p99 µs", 0, False),
    ("rand_mean", "random 64 KiB QD1, cold, mean µs", 0, False),
    ("rand_n", "… reads done (time limit)", 0, True),
    ("rand_warm_p50", "random 64 KiB QD1, same offsets again, p50 µs", 0, False),
    ("rand_warm_p99", "random 64 KiB QD1, same offsets again, p99 µs", 0, False),
    ("probe_cold", "ffprobe, cold, ms", 0, False),
    ("probe_warm", "ffprobe, warm, ms", 0, False),
    ("seek_cold", "ffmpeg -ss 60 seek + decode 1 frame, cold, ms", 0, False),
    ("seek_warm", "ffmpeg -ss 60 seek + decode 1 frame, warm, ms", 0, False),
    ("seq_hot", "sequential read, fresh mount, server's page cache warm, MB/s", 0, True),
    ("rand_hot_p50", "random 64 KiB QD1, fresh mount, server's page cache warm, p50 µs", 0, False),
    ("rand_hot_p99", "random 64 KiB QD1, fresh mount, server's page cache warm, p99 µs", 0, False),
    ("seq_cold_served", "MiB the server read during the cold sequential run (file: 1024)", 0, False),
    ("rand_served", "MiB the server read during the cold random run", 0, False),
    ("seq_cold_cpu", "FUSE process CPU during the cold sequential read, s", 2, False),
    ("hwm_seq", "FUSE process peak RSS, sequential session, MiB", 1, False),
    ("hwm_rand", "FUSE process peak RSS, random session, MiB", 1, False),
    ("hwm_probe", "FUSE process peak RSS, ffprobe session, MiB", 1, False),
    ("hwm_seek", "FUSE process peak RSS, seek session, MiB", 1, False),
    ("hwm_hot_seq", "FUSE process peak RSS, sequential with the server warm, MiB", 1, False),
    ("hwm_hot_rand", "FUSE process peak RSS, random with the server warm, MiB", 1, False),
]


def parse_size(s):
    s = s.strip().upper()
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if s.endswith(suffix) or s.endswith(suffix + "B") or s.endswith(suffix + "IB"):
            s = s[: s.index(suffix)]
            mult = m
            break
    return float(s) * mult


def ratio(x):
    if x >= 0.1:
        return f"{x:.2f}×"
    if x >= 0.001:
        return f"{x:.3f}×"
    return f"1/{1 / x:.0f}"


def fmt(v, d):
    if v is None:
        return "–"
    if d == 0:
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return f"{v:.{d}f}"


def report(raw_path, meta_path, problems_path, notes_path):
    meta = {}
    for line in open(meta_path):
        if "=" in line:
            k, v = line.rstrip("\n").split("=", 1)
            meta[k] = v
    data = {}  # (client, metric) -> [(round, value)]
    for line in open(raw_path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 4:
            continue
        r, c, m, v = parts
        try:
            data.setdefault((c, m), []).append((int(r), float(v)))
        except ValueError:
            pass
    def lines_of(path):
        return [p for p in open(path).read().splitlines() if p.strip()] if os.path.exists(path) else []

    problems = lines_of(problems_path)
    notes = lines_of(notes_path)
    clients = meta.get("CLIENTS", "").split()
    runs = int(meta.get("RUNS", "3"))
    cache = meta.get("CACHE_SIZE", "256M")
    cache_mib = parse_size(cache) / (1 << 20)

    def vals(c, m):
        return [v for _, v in sorted(data.get((c, m), []))]

    def med(c, m):
        xs = vals(c, m)
        return statistics.median(xs) if xs else None

    def hwm_max(c):
        xs = [v for m, *_ in ROWS if m.startswith("hwm") for v in vals(c, m)]
        return max(xs) if xs else None

    out = []
    w = out.append
    w(HEADER)
    w("")
    w(f"Produced by `bench/mount-read.sh` on {meta.get('START', '?')}.")
    w("")
    w(f"- Machine: {meta.get('CPU', '?')}, {meta.get('MEM', '?')} RAM, Linux {meta.get('KERNEL', '?')}; shared and noisy. "
      f"Files on {meta.get('FS', '?')} (a virtual disk; the host may cache it).")
    w(f"- ferry {meta.get('FERRY_REV', '?')} (release build of {meta.get('FERRY_BUILT', '?')}): "
      f"`ferry serve --store DIR` on loopback, `ferry mount URL MNT --cache-size {cache}` (memory cache only, no `--cache-dir`).")
    w(f"- rclone {meta.get('RCLONE', '?').replace('rclone ', '')}: `rclone serve http DIR --read-only` and "
      "`rclone mount :http: MNT --http-url URL --read-only --vfs-cache-mode off|full` "
      "(other options at their defaults: 128 MiB read chunks, 16 MiB --buffer-size; the full cache in a fresh directory on the same disk).")
    w(f"- {meta.get('HTTPDIRFS', '?')} ({meta.get('FUSE2', '').strip()}), default options (no `--cache`) plus `--no-range-check` "
      "(1.2.5 looks for `Accept-Ranges: bytes` in the 206 answer, which nginx sends only with 200s, and exits otherwise; nginx does serve ranges), "
      f"mounting nginx {meta.get('NGINX', '?')} serving the same directory with `autoindex on` "
      "(httpdirfs needs an HTML index; nginx is the usual server for it and is not the bottleneck here).")
    w(f"- Data: `big.bin`, {int(meta.get('BIG_MIB', '1024'))} MiB from /dev/urandom; `video.mp4`, 120 s of ffmpeg `testsrc` 1280x720 25 fps, "
      f"libx264 `-preset veryfast`, {int(meta.get('VIDEO_SIZE', '0')) / 1e6:.1f} MB, top-level boxes "
      f"`{meta.get('VIDEO_BOXES', '?')}` (moov after mdat, i.e. at the end: no +faststart).")
    w(f"- {meta.get('FIO', 'fio')}, `--ioengine=psync --direct=0` everywhere (buffered reads through the page cache, "
      "as O_DIRECT is not supported by every FUSE client; the local disk is read the same way). "
      f"Sequential: `--rw=read --bs=1M` over the whole file. Random: `--rw=randread --bs=64k`, queue depth 1, "
      f"{meta.get('RAND_IOS', '?')} reads at random offsets over the whole 1 GiB (fio's default fadvise RANDOM hint, "
      "fixed seed: the same offsets for every client and run); latency is fio's clat (the read() call).")
    w("- Cold: before every cold measurement the FUSE client is unmounted and mounted again with its caches emptied "
      "(ferry's is in-process memory; rclone's full cache directory is deleted; httpdirfs has none), "
      "then `sync; echo 3 > /proc/sys/vm/drop_caches`, then fio, ffprobe and ffmpeg read a 1 s clip outside the served directory so that "
      "the tools' own code is back in memory (a cold figure is about the data, not about loading libavcodec). Warm: the same measurement again at once, same mount, nothing dropped "
      "(fio `--invalidate=0`). Each session (sequential, random, ffprobe, seek) has its own fresh mount.")
    w("- ffprobe: `ffprobe -v error -show_format -show_streams FILE`; seek + decode: "
      "`ffmpeg -ss 60 -i FILE -frames:v 1 -f null -`; wall time of the whole command, process start included.")
    w("- RSS: `VmHWM` (peak resident set) of the FUSE process at the end of each session.")
    w(f"- Each figure is the median of {runs} rounds (individual rounds in brackets); the order of the clients rotates every round. "
      "MB/s is 10^6 bytes/s.")
    loads = [x for x in meta.get("LOADS", "").split(";") if x]
    if loads:
        w(f"- Load average (1/5/15 min) at the start of each round: {'; '.join(loads)}.")
    overlaps = [x for x in meta.get("OVERLAPS", "").split(";") if x]
    if overlaps:
        w(f"- **Another benchmark ran during: {'; '.join(overlaps)}** — those figures are disturbed.")
    else:
        w("- No other benchmark (bench/serve.sh, upload.sh, ws.sh, wrk) was running when the script started or "
          "active (running anything besides its own wait loop) at the start or end of any round.")
    if meta.get("BIG_MIB", "1024") != "1024" or meta.get("DROP_CACHES", "1") != "1":
        w(f"- **TRIAL RUN, not a measurement: BIG_MIB={meta.get('BIG_MIB')} DROP_CACHES={meta.get('DROP_CACHES')}.**")
    w("")

    # Main table
    cols = [c for c in clients]
    w("| measurement | " + " | ".join(NAMES.get(c, c) for c in cols) + " |")
    w("|---|" + "---|" * len(cols))
    full_mib = float(meta.get("BIG_MIB", "1024"))
    rand_ios = float(meta.get("RAND_IOS", "1000"))
    for m, label, d, _ in ROWS:
        if not any(vals(c, m) for c in cols):
            continue
        if m.endswith("_mib") and all(v >= full_mib for c in cols for v in vals(c, m)):
            continue
        if m.endswith("_n") and all(v >= rand_ios for c in cols for v in vals(c, m)):
            continue
        cells = []
        for c in cols:
            xs = vals(c, m)
            if not xs:
                cells.append("–")
            else:
                cells.append(f"{fmt(statistics.median(xs), d)} [{' '.join(fmt(x, d) for x in xs)}]")
        w(f"| {label} | " + " | ".join(cells) + " |")
    w("")

    # Ratios
    peers = [c for c in cols if c != "ferry"]
    if "ferry" in cols and peers:
        w("ferry mount against each peer, ratio of the medians above (throughput: ferry ÷ peer, higher is better for ferry; "
          "times and latencies: ferry ÷ peer, lower is better for ferry):")
        w("")
        w("| measurement | " + " | ".join(f"ferry ÷ {NAMES.get(c, c)}" for c in peers) + " |")
        w("|---|" + "---|" * len(peers))
        for m, label, d, higher in ROWS:
            if m.startswith("hwm") or m == "seq_cold_cpu" or m.endswith(("_mib", "_n", "_served")):
                continue
            f = med("ferry", m)
            if f is None:
                continue
            cells = []
            for c in peers:
                p = med(c, m)
                cells.append("–" if p in (None, 0) else ratio(f / p))
            w(f"| {label} | " + " | ".join(cells) + " |")
        w("")

    # Server reference
    servers = [x for x in ("ferry-serve", "nginx") if any(k[0] == x for k in data)]
    if servers:
        w(f"Reference without FUSE: {meta.get('RANGE_REQS', '?')} random Range GETs one after the other on one keep-alive "
          "connection (`bench/mount-read-ranges.py`), straight to the servers, page cache dropped first (cold) and then "
          "the same offsets again (warm); µs from request to whole body:")
        w("")
        w("| request | " + " | ".join(f"{x} p50 | {x} p99" for x in servers) + " |")
        w("|---|" + "---|---|" * len(servers))
        for size in ("64k", "1024k"):
            for t in ("cold", "warm"):
                cells = []
                for x in servers:
                    for q in ("p50", "p99"):
                        xs = vals(x, f"range{size}_{t}_{q}")
                        cells.append(f"{fmt(statistics.median(xs), 0)} [{' '.join(fmt(v, 0) for v in xs)}]" if xs else "–")
                label = ("64 KiB" if size == "64k" else "1 MiB") + f", {t}"
                w(f"| {label} | " + " | ".join(cells) + " |")
        w("")

    # Targets
    def verdict(ok):
        return "met" if ok else "**MISSED**"

    f_seq = med("ferry", "seq_cold")
    rows = []
    for c in ("rclone-off", "rclone-full"):
        p = med(c, "seq_cold")
        if f_seq is not None and p:
            rows.append((f"cold sequential ≥ 2× {NAMES[c]}", f"{f_seq / p:.2f}× ({fmt(f_seq, 0)} vs {fmt(p, 0)} MB/s)", f_seq / p >= 2))
    p = med("local", "seq_cold")
    if f_seq is not None and p:
        rows.append(("cold sequential ≥ 0.5× local disk", f"{f_seq / p:.2f}× ({fmt(f_seq, 0)} vs {fmt(p, 0)} MB/s)", f_seq / p >= 0.5))
    f = med("ferry", "rand_p50")
    if f is not None:
        rows.append(("random 64 KiB p50 < 1 ms (cold)", f"{f / 1000:.2f} ms", f < 1000))
    f = med("ferry", "rand_hot_p50")
    if f is not None:
        rows.append(("random 64 KiB p50 < 1 ms (fresh mount, server's page cache warm)", f"{f / 1000:.2f} ms", f < 1000))
    f = med("ferry", "rand_warm_p50")
    if f is not None:
        rows.append(("random 64 KiB p50 < 1 ms (same offsets again)", f"{f / 1000:.3f} ms", f < 1000))
    f_hot = med("ferry", "seq_hot")
    for c in ("rclone-off", "rclone-full"):
        p = med(c, "seq_hot")
        if f_hot is not None and p:
            rows.append((f"sequential, server's page cache warm, ≥ 2× {NAMES[c]}", f"{f_hot / p:.2f}× ({fmt(f_hot, 0)} vs {fmt(p, 0)} MB/s)", f_hot / p >= 2))
    for m, what in (("probe_cold", "ffprobe (cold)"), ("probe_warm", "ffprobe (warm)"),
                    ("seek_cold", "seek + decode (cold)"), ("seek_warm", "seek + decode (warm)")):
        f, p = med("ferry", m), med("local", m)
        if f is not None and p:
            rows.append((f"{what} ≤ 1.5× local disk", f"{f / p:.2f}× ({fmt(f, 0)} vs {fmt(p, 0)} ms)", f / p <= 1.5))
    h = hwm_max("ferry")
    if h is not None:
        limit = cache_mib + 64
        rows.append((f"RSS ≤ cache size + 64 MiB = {limit:.0f} MiB", f"{h:.1f} MiB (highest VmHWM of all sessions)", h <= limit))
    if rows:
        w("Targets (ferry mount). The issue's targets are the cold rows and the RSS row; the rows marked warm, "
          "same offsets again or server's page cache warm are for information:")
        w("")
        w("| target | measured | verdict |")
        w("|---|---|---|")
        for t, mv, ok in rows:
            w(f"| {t} | {mv} | {verdict(ok)} |")
        w("")
        def official(t):
            return not any(k in t for k in ("(warm)", "same offsets again", "page cache warm"))

        missed = [t for t, _, ok in rows if not ok and official(t)]
        met = [t for t, _, ok in rows if ok and official(t)]
        w(f"The issue's targets: met: {'; '.join(met) if met else 'none'}. Missed: {'; '.join(missed) if missed else 'none'}.")
        w("")

    # Per-client peak RSS summary
    hs = [(c, hwm_max(c)) for c in cols if hwm_max(c) is not None]
    if hs:
        w("Highest peak RSS of any session: " + "; ".join(f"{NAMES.get(c, c)} {h:.1f} MiB" for c, h in hs) + ".")
        w("")

    if notes:
        w("What the clients and servers logged at WARN (ferry) / NOTICE (rclone) level, most frequent first:")
        w("")
        for n in notes:
            w(f"- {n}")
        w("")
    if problems:
        w("Problems seen during the run:")
        w("")
        for p in problems:
            w(f"- {p}")
    else:
        w(f"No errors: every mount came up with the right file sizes; `cmp` of both files (through httpdirfs only the first {meta.get('CHECK_SLOW_MIB', '?')} MiB of big.bin) "
          "and of 300 random 64 KiB ranges plus the file's tail, read through each mount on a fresh mount, matched the disk; every fio run read what it should; "
          "every ffprobe found the 120 s duration and every ffmpeg run exited 0; no FUSE process or server died; "
          "ferry's logs hold no error lines.")
    w("")
    return "\n".join(out)


def splice(results_path, section_path):
    splice_section(results_path, open(section_path).read(), HEADER)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--splice":
        splice(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5:
        sys.stdout.write(report(*sys.argv[1:5]))
    else:
        sys.exit(__doc__)
