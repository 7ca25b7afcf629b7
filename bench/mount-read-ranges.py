#!/usr/bin/env python3
"""Latency of random Range GETs straight to an HTTP server (no FUSE), as a
reference for bench/mount-read.sh's random-read figures.

    mount-read-ranges.py URL FILE_SIZE RANGE_BYTES COUNT [SEED]

One keep-alive connection, COUNT requests one after the other (queue depth
1), each for RANGE_BYTES at a random offset aligned to RANGE_BYTES; every
answer must be 206 with exactly RANGE_BYTES of body. Prints
"p50_us p99_us mean_us" of the time from sending a request to having read
its whole body.
"""

import http.client
import random
import statistics
import sys
import time
import urllib.parse


def main():
    url, size, length, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    path = u.path or "/"
    rng = random.Random(seed)
    blocks = size // length
    times = []
    for _ in range(count):
        off = rng.randrange(blocks) * length
        t0 = time.perf_counter()
        conn.request("GET", path, headers={"Range": f"bytes={off}-{off + length - 1}"})
        resp = conn.getresponse()
        body = resp.read()
        times.append(time.perf_counter() - t0)
        if resp.status != 206 or len(body) != length:
            sys.exit(f"{url}: range at {off}: status {resp.status}, {len(body)} bytes")
    times.sort()
    p = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e6
    print(f"{p(0.50):.1f} {p(0.99):.1f} {statistics.mean(times) * 1e6:.1f}")


if __name__ == "__main__":
    main()
