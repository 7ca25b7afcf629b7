#!/usr/bin/env python3
"""Markdown section for bench/mount-write.sh, and splicing it into RESULTS.md.

    mount-write-report.py RAW.tsv META.env PROBLEMS.txt  > section.md
    mount-write-report.py --splice RESULTS.md section.md

RAW.tsv lines: round, client, workload, metric, value (tab separated);
metrics: cmd and committed (seconds), own_cpu (seconds), others_cores.
"""

import os
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_md import splice  # noqa: E402

HEADER = "## mount-write (ferry mount vs rclone mount --vfs-cache-mode writes, local disk)"

NAMES = {"local": "local disk", "ferry": "ferry mount", "rclone": "rclone mount (writes)"}


def load(raw):
    data = defaultdict(list)  # (client, workload, metric) -> [values in round order]
    for line in open(raw):
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 5:
            _, client, workload, metric, value = parts
            data[(client, workload, metric)].append(float(value))
    return data


def median(values):
    return statistics.median(values) if values else None


def report(raw, meta_path, problems_path):
    data = load(raw)
    meta = dict(l.rstrip("\n").split("=", 1) for l in open(meta_path) if "=" in l)
    problems = [l.strip() for l in open(problems_path) if l.strip()]
    big = int(meta["BIG_MIB"])
    workloads = {
        "dd": f"`dd if=/dev/zero bs=1M count={big} conv=fsync`",
        "cp": f"`cp` of a {big} MiB random file",
        "untar": f"`tar -xf` of {meta['SMALL_FILES']} small files ({int(meta['SMALL_BYTES']) / 1e6:.0f} MB)",
    }
    clients = [c for c in ("local", "ferry", "rclone") if any(k[0] == c for k in data)]
    out = []
    w = out.append
    w(HEADER)
    w("")
    w(f"Produced by `bench/mount-write.sh` on {meta['START']}.")
    w("")
    w(f"- Machine: {meta['CPU']}, {meta['MEM']}, Linux {meta['KERNEL']}; {meta['FS']} holds the sources, the stores, the caches and the local target. Shared and noisy: load averages at the start of each round {meta['LOADS']}; {meta['WAIT_NOTE']}; before each measurement the script waited for the machine to use < {meta['QUIET']}.")
    w(f"- ferry {meta['FERRY_REV']} (release build): `ferry serve --store DIR` and `ferry mount URL MNT --cache-dir DIR {meta['FERRY_MOUNT_ARGS']}`".rstrip() + " (no `--max-staging`: the disk is the bound). " + f"{meta['RCLONE']}: `rclone serve webdav DIR` and `rclone mount :webdav: MNT --vfs-cache-mode writes --vfs-write-back {meta['RCLONE_WRITE_BACK']} --cache-dir DIR` (its default write-back of 5 s would add a timer to every committed time).")
    w(f"- Every measurement: a fresh server on an empty store, a fresh mount with an empty cache directory. \"command\" = wall time of the command; \"committed\" = from its start until the server's store holds every byte (polled every 50 ms; the local disk: the command's time). Medians of {meta['RUNS']} runs, runs in brackets; MB/s = 10^6 bytes/s over the committed time. CPU: user+system seconds of the command, the mount process and the server together; others' cores: what the rest of the machine used meanwhile (`/proc/stat` minus those).")
    w("")
    w("| workload | client | command s [runs] | committed s [runs] | MB/s committed | CPU s | others' cores [runs] |")
    w("|---|---|---|---|---|---|---|")
    for wl, label in workloads.items():
        for c in clients:
            cmd = data.get((c, wl, "cmd"), [])
            com = data.get((c, wl, "committed"), [])
            if not cmd:
                continue
            mb = ""
            if wl in ("dd", "cp") and com:
                mb = f"{big * 1048576 / median(com) / 1e6:.0f}"
            elif com:
                mb = f"{int(meta['SMALL_BYTES']) / median(com) / 1e6:.1f}"
            cpu = median(data.get((c, wl, "own_cpu"), []))
            others = data.get((c, wl, "others_cores"), [])
            w(f"| {label} | {NAMES[c]} | {median(cmd):.2f} [{' '.join(f'{v:.2f}' for v in cmd)}] | "
              f"{median(com):.2f} [{' '.join(f'{v:.2f}' for v in com)}] | {mb} | {cpu:.2f} | "
              f"{median(others):.2f} [{' '.join(f'{v:.2f}' for v in others)}] |")
    w("")
    w("Targets (ratios of median committed times: how many times faster ferry gets the data onto the server):")
    w("")
    w("| target | measured | verdict |")
    w("|---|---|---|")

    def med(c, wl, m="committed"):
        return median(data.get((c, wl, m), []))

    for wl, label in workloads.items():
        f, r = med("ferry", wl), med("rclone", wl)
        if f and r:
            ratio = r / f
            cmd_ratio = med("rclone", wl, "cmd") / med("ferry", wl, "cmd")
            w(f"| {label}: ferry ≥ 1.5× rclone | {ratio:.2f}× ({f:.2f} s vs {r:.2f} s; by command time {cmd_ratio:.2f}×) | {'met' if ratio >= 1.5 else '**MISSED**'} |")
        else:
            w(f"| {label}: ferry ≥ 1.5× rclone | not measured | **MISSING** |")
    f, l = med("ferry", "dd"), med("local", "dd")
    if f and l:
        ratio = l / f
        w(f"| {workloads['dd']}: ferry ≥ 0.5× the local disk | {ratio:.2f}× ({f:.2f} s vs {l:.2f} s) | {'met' if ratio >= 0.5 else '**MISSED**'} |")
    else:
        w(f"| {workloads['dd']}: ferry ≥ 0.5× the local disk | not measured | **MISSING** |")
    w("")
    if problems:
        w("Problems during the run:")
        w("")
        for p in problems:
            w(f"- {p}")
    else:
        w("No problems: every command exited 0, everything was committed on the server, the first round's data compared equal byte for byte (files with `cmp`, the tree with `diff -r`), and no log had ERROR lines or panics.")
    w("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--splice":
        splice(sys.argv[2], open(sys.argv[3]).read(), HEADER)
    elif len(sys.argv) == 4:
        sys.stdout.write(report(*sys.argv[1:4]))
    else:
        sys.exit(__doc__)
