#!/usr/bin/env python3
"""Load generator for bench/ws.sh: ferry.v1 WebSocket vs HTTP chunk PUTs, and
change-feed latency. Needs `websockets` and `crc32c` from PyPI.

  ws_load.py upload --server URL --file F --remote P --transport ws|http
                    [--ws-client raw|lib] [--chunk-size 1048576] [--parallel 4]
                    [--server-pid PID]
      Creates an upload session for F with that chunk size (not timed), then
      sends every chunk with at most --parallel chunks in flight and commits;
      times chunk transfer + complete. Prints one JSON object.
      ws:   one WebSocket (subprotocol ferry.v1); a chunk is in flight from
            its binary frame until its `ack`. --ws-client raw (default): the
            minimal RFC 6455 client below; lib: the `websockets` library.
      http: --parallel keep-alive connections, each with one
            `PUT /v1/uploads/{id}/chunks/{n}` outstanding at a time.
      All run on asyncio in one thread, CRCs computed before timing, file
      held in memory; with the raw WS client the client does about the same
      work per byte on both transports (plus masking, in C, for WS). With
      --server-pid, also reports the server's CPU seconds over the timed part.

  ws_load.py events --server URL --via ws|sse --count N [--pace-ms 5]
      Subscribes (WS `watch` or `GET /v1/events`), then makes N small
      `PUT /v1/files/...` one after another; for each, records when the PUT
      was sent, when its response arrived and when its change event arrived,
      all on one monotonic clock in this one process. Prints one JSON object
      with the per-PUT samples.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import struct
import sys
import time
from urllib.parse import urlsplit

import crc32c
from websockets.asyncio.client import connect as ws_connect

try:
    from websockets.speedups import apply_mask  # C, ~18 GB/s
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

now = time.perf_counter  # monotonic, high resolution


# ---------------------------------------------------------------- HTTP/1.1


class Http:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    def close(self):
        if self.writer:
            self.writer.close()

    async def request(self, method, target, body=b"", headers=None):
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}",
                f"Content-Length: {len(body)}"]
        for k, v in (headers or {}).items():
            head.append(f"{k}: {v}")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        if body:
            self.writer.write(body)
        await self.writer.drain()
        return await self.read_response()

    async def read_head(self):
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        headers = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    async def read_response(self):
        status, headers = await self.read_head()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b"".join([c async for c in self.chunks()])
        elif "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif status in (204, 304):
            body = b""
        else:
            body = await self.reader.read()
        return status, headers, body

    async def chunks(self):
        """Yields the pieces of a chunked body as they arrive."""
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            if size == 0:
                await self.reader.readline()
                return
            data = await self.reader.readexactly(size)
            await self.reader.readline()
            yield data


def proc_cpu_s(pid):
    """utime + stime of a process, in seconds (None without a pid)."""
    if not pid:
        return None
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds this process and the server spend between start() and stop()."""

    def __init__(self, server_pid):
        self.pid = server_pid

    def start(self):
        self.c0, self.s0 = time.process_time(), proc_cpu_s(self.pid)

    def stop(self):
        self.client_cpu_s = time.process_time() - self.c0
        s1 = proc_cpu_s(self.pid)
        self.server_cpu_s = None if s1 is None else s1 - self.s0


def crc_b64(c):
    return base64.b64encode(c.to_bytes(4, "big")).decode()


# ---------------------------------------------------------------- uploads


async def create_session(host, port, remote, size, chunk_size):
    h = await Http(host, port).open()
    try:
        body = json.dumps({"path": remote, "size": size, "chunk_size": chunk_size}).encode()
        status, _, resp = await h.request("POST", "/v1/uploads", body,
                                          {"Content-Type": "application/json"})
        if status != 201:
            raise RuntimeError(f"POST /v1/uploads: {status} {resp[:300]!r}")
        return json.loads(resp)
    finally:
        h.close()


async def upload_http(host, port, data, crcs, remote, chunk_size, parallel, cpu):
    t_create = now()
    session = await create_session(host, port, remote, len(data), chunk_size)
    t_create = now() - t_create
    sid, count = session["id"], session["chunk_count"]
    assert session["chunk_size"] == chunk_size, session
    conns = [await Http(host, port).open() for _ in range(parallel)]
    mv = memoryview(data)
    next_index = iter(range(count))

    async def worker(h):
        for n in next_index:  # shared iterator: each index taken once
            payload = mv[n * chunk_size:(n + 1) * chunk_size]
            status, _, body = await h.request(
                "PUT", f"/v1/uploads/{sid}/chunks/{n}", payload,
                {"X-Ferry-Crc32c": crc_b64(crcs[n]),
                 "Content-Type": "application/octet-stream"})
            if status != 204:
                raise RuntimeError(f"chunk {n}: {status} {body[:300]!r}")

    cpu.start()
    t0 = now()
    await asyncio.gather(*(worker(h) for h in conns))
    t_chunks = now()
    status, _, body = await conns[0].request("POST", f"/v1/uploads/{sid}/complete")
    t1 = now()
    cpu.stop()
    for h in conns:
        h.close()
    if status != 200:
        raise RuntimeError(f"complete: {status} {body[:300]!r}")
    meta = json.loads(body)
    assert meta["size"] == len(data), meta
    return dict(create_s=t_create, chunks_s=t_chunks - t0, complete_s=t1 - t_chunks,
                total_s=t1 - t0, chunk_count=count)


class LibWs:
    """ferry.v1 over the `websockets` library (its framing copies and masks
    each 1 MiB message in Python-managed buffers: ~1 ms of client CPU per MiB)."""

    async def open(self, host, port):
        self.ws = await ws_connect(f"ws://{host}:{port}/v1/ws", subprotocols=["ferry.v1"],
                                   compression=None, max_size=None, ping_interval=None)
        assert self.ws.subprotocol == "ferry.v1", self.ws.subprotocol
        return self

    async def send_text(self, text):
        await self.ws.send(text)

    async def send_binary(self, head, payload):
        await self.ws.send(head + payload)

    async def recv(self):
        return await self.ws.recv()

    async def close(self):
        await self.ws.close()


class RawWs:
    """ferry.v1 over a minimal RFC 6455 client on asyncio streams: client
    frames masked with a fresh random key (C `apply_mask` from websockets),
    header and payload written without joining them; pings answered."""

    async def open(self, host, port):
        self.reader, self.writer = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write((f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           "Sec-WebSocket-Protocol: ferry.v1\r\n\r\n").encode())
        await self.writer.drain()
        status_line = await self.reader.readline()
        headers = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        accept = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        if (status_line.split()[1:2] != [b"101"] or headers.get("sec-websocket-accept") != accept
                or headers.get("sec-websocket-protocol") != "ferry.v1"):
            raise RuntimeError(f"WebSocket upgrade refused: {status_line!r} {headers}")
        return self

    def _frame(self, opcode, parts):
        length = sum(len(p) for p in parts)
        b0 = 0x80 | opcode
        if length < 126:
            head = struct.pack("!BB", b0, 0x80 | length)
        elif length < 65536:
            head = struct.pack("!BBH", b0, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", b0, 0x80 | 127, length)
        mask = os.urandom(4)
        self.writer.write(head + mask)
        for p in parts:  # every part but the last has a length that is a multiple of 4
            self.writer.write(apply_mask(p, mask))

    async def send_text(self, text):
        self._frame(0x1, [text.encode()])
        await self.writer.drain()

    async def send_binary(self, head, payload):
        assert len(head) % 4 == 0
        self._frame(0x2, [head, payload])
        await self.writer.drain()

    async def recv(self):
        message, kind = [], None
        while True:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            mask = await self.reader.readexactly(4) if b1 & 0x80 else None
            data = await self.reader.readexactly(n)
            if mask:
                data = apply_mask(data, mask)
            op = b0 & 0x0F
            if op == 0x9:  # ping
                self._frame(0xA, [data])
                continue
            if op == 0xA:
                continue
            if op == 0x8:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                raise ConnectionError(f"WebSocket closed by the server: {code} {data[2:]!r}")
            if op in (0x1, 0x2):
                kind, message = op, [data]
            else:  # continuation
                message.append(data)
            if b0 & 0x80:
                body = b"".join(message)
                return body.decode() if kind == 0x1 else body

    async def close(self):
        try:
            self._frame(0x8, [struct.pack("!H", 1000)])
            await self.writer.drain()
            await asyncio.wait_for(self.reader.read(), 2)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        self.writer.close()


async def upload_ws(host, port, data, crcs, remote, chunk_size, parallel, cpu, client="raw"):
    ws = await (RawWs() if client == "raw" else LibWs()).open(host, port)
    try:
        ch = 1
        t_create = now()
        await ws.send_text(json.dumps({"op": "upload.create", "ch": ch, "path": remote,
                                       "size": len(data), "chunk_size": chunk_size}))
        ready = json.loads(await ws.recv())
        t_create = now() - t_create
        if ready.get("op") != "ready":
            raise RuntimeError(f"upload.create: {ready}")
        count = ready["chunk_count"]
        assert ready["chunk_size"] == chunk_size, ready
        mv = memoryview(data)
        window = asyncio.Semaphore(parallel)
        acked = set()
        all_acked = asyncio.Event()
        done = asyncio.get_running_loop().create_future()

        async def reader():
            while True:
                m = json.loads(await ws.recv())
                op = m.get("op")
                if op == "ack":
                    if m["index"] not in acked:
                        acked.add(m["index"])
                        window.release()
                        if len(acked) == count:
                            all_acked.set()
                elif op == "progress":
                    pass
                elif op == "done":
                    done.set_result(m)
                    return
                else:
                    raise RuntimeError(f"unexpected message: {m}")

        def frame(n):
            payload = mv[n * chunk_size:(n + 1) * chunk_size]
            return struct.pack(">IQI", ch, n * chunk_size, crcs[n]), payload

        reading = asyncio.create_task(reader())

        async def guarded(aw):
            """Awaits aw, failing at once if the reader failed."""
            task = asyncio.ensure_future(aw)
            await asyncio.wait([task, reading], return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                reading.result()
                raise RuntimeError("the WebSocket closed")
            return task.result()

        cpu.start()
        t0 = now()
        for n in range(count):
            await guarded(window.acquire())
            await ws.send_binary(*frame(n))
        await guarded(all_acked.wait())
        t_chunks = now()
        await ws.send_text(json.dumps({"op": "upload.complete", "ch": ch}))
        meta = (await guarded(done))["meta"]
        t1 = now()
        cpu.stop()
        await reading
        assert meta["size"] == len(data), meta
    finally:
        await ws.close()
    return dict(create_s=t_create, chunks_s=t_chunks - t0, complete_s=t1 - t_chunks,
                total_s=t1 - t0, chunk_count=count)


async def cmd_upload(a):
    u = urlsplit(a.server)
    t = now()
    with open(a.file, "rb") as f:
        data = f.read()
    t_read = now() - t
    t = now()
    cs = a.chunk_size
    crcs = [crc32c.crc32c(memoryview(data)[i:i + cs]) for i in range(0, len(data), cs)] or [0]
    t_crc = now() - t
    cpu = CpuMeter(a.server_pid)
    args = (u.hostname, u.port, data, crcs, a.remote, cs, a.parallel, cpu)
    if a.transport == "ws":
        r = await upload_ws(*args, client=a.ws_client)
        r.update(ws_client=a.ws_client)
    else:
        r = await upload_http(*args)
    r.update(transport=a.transport, bytes=len(data), chunk_size=cs, parallel=a.parallel,
             read_s=t_read, crc_s=t_crc, client_cpu_s=cpu.client_cpu_s,
             server_cpu_s=cpu.server_cpu_s, mb_s=len(data) / r["total_s"] / 1e6)
    print(json.dumps(r))


# ---------------------------------------------------------------- events


async def sse_events(h, prefix, on_event):
    status, headers = await h.read_head()
    if status != 200:
        raise RuntimeError(f"GET /v1/events: {status}")
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"

    async def pieces():
        if chunked:
            async for c in h.chunks():
                yield c
        else:
            while True:
                c = await h.reader.read(65536)
                if not c:
                    return
                yield c

    buf = b""
    async for piece in pieces():
        t = now()
        buf += piece
        while True:
            # Events end with a blank line (\n\n; \r\n\r\n also allowed).
            i, j = buf.find(b"\n\n"), buf.find(b"\r\n\r\n")
            cut = [(x, ln) for x, ln in ((i, 2), (j, 4)) if x >= 0]
            if not cut:
                break
            x, ln = min(cut)
            block, buf = buf[:x], buf[x + ln:]
            name, data = "message", []
            for line in block.decode().splitlines():
                if line.startswith(":"):
                    continue
                k, _, v = line.partition(":")
                v = v[1:] if v.startswith(" ") else v
                if k == "event":
                    name = v
                elif k == "data":
                    data.append(v)
            if data:
                on_event(name, json.loads("\n".join(data)), t)


async def cmd_events(a):
    u = urlsplit(a.server)
    host, port = u.hostname, u.port
    prefix = a.prefix
    arrivals = {}  # path -> arrival time
    waiters = {}   # path -> future resolved on arrival
    other = []     # lagged errors and anything unexpected

    def on_event(name, change, t):
        if name != "change":
            other.append({"event": name, "data": change})
            return
        path = change["path"]
        arrivals.setdefault(path, t)
        w = waiters.pop(path, None)
        if w is not None and not w.done():
            w.set_result(t)

    if a.via == "ws":
        ws = await ws_connect(f"ws://{host}:{port}/v1/ws", subprotocols=["ferry.v1"],
                              compression=None, ping_interval=None)
        await ws.send(json.dumps({"op": "watch", "ch": 3, "prefix": prefix}))

        async def ws_reader():
            async for msg in ws:
                t = now()
                m = json.loads(msg)
                if m.get("op") == "change":
                    on_event("change", m, t)
                else:
                    on_event(m.get("op", "?"), m, t)
        reading = asyncio.create_task(ws_reader())
    else:
        sub = await Http(host, port).open()
        sub.writer.write((f"GET /v1/events?prefix={prefix} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                          "Accept: text/event-stream\r\n\r\n").encode())
        await sub.writer.drain()
        reading = asyncio.create_task(sse_events(sub, prefix, on_event))

    putter = await Http(host, port).open()
    body = os.urandom(a.body_bytes)

    async def put(path):
        t_send = now()
        status, _, resp = await putter.request("PUT", f"/v1/files/{path}", body)
        t_resp = now()
        if status not in (200, 201):
            raise RuntimeError(f"PUT {path}: {status} {resp[:200]!r}")
        return t_send, t_resp

    async def wait_for(path, timeout):
        if path in arrivals:
            return arrivals[path]
        fut = asyncio.get_running_loop().create_future()
        waiters[path] = fut
        await asyncio.wait([fut, reading], timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        waiters.pop(path, None)
        if reading.done():
            reading.result()
            raise RuntimeError("subscriber stream ended")
        return arrivals.get(path)

    # The subscription has no acknowledgement: warm up until an event arrives.
    for w in range(50):
        path = f"{prefix}/warmup-{w}"
        await put(path)
        if await wait_for(path, 0.2) is not None:
            break
    else:
        raise RuntimeError("no change event arrived for 50 warm-up PUTs")

    samples, missing = [], 0
    t_start = now()
    for i in range(a.count):
        path = f"{prefix}/e{i:05d}"
        t_send, t_resp = await put(path)
        t_ev = await wait_for(path, a.timeout)
        if t_ev is None:
            missing += 1
            samples.append(dict(i=i, put_ms=(t_resp - t_send) * 1e3, missing=True))
        else:
            samples.append(dict(i=i, put_ms=(t_resp - t_send) * 1e3,
                                after_resp_ms=(t_ev - t_resp) * 1e3,
                                after_send_ms=(t_ev - t_send) * 1e3))
        if a.pace_ms:
            await asyncio.sleep(a.pace_ms / 1e3)
    elapsed = now() - t_start
    putter.close()
    reading.cancel()
    print(json.dumps(dict(via=a.via, count=a.count, missing=missing, other=other[:5],
                          other_count=len(other), elapsed_s=elapsed, samples=samples)))


def main():
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    up = sp.add_parser("upload")
    up.add_argument("--server", required=True)
    up.add_argument("--file", required=True)
    up.add_argument("--remote", required=True)
    up.add_argument("--transport", choices=["ws", "http"], required=True)
    up.add_argument("--chunk-size", type=int, default=1 << 20)
    up.add_argument("--parallel", type=int, default=4)
    up.add_argument("--ws-client", choices=["raw", "lib"], default="raw",
                    help="raw: minimal client in this file; lib: the websockets library")
    up.add_argument("--server-pid", type=int, help="to read the server's CPU time")
    ev = sp.add_parser("events")
    ev.add_argument("--server", required=True)
    ev.add_argument("--via", choices=["ws", "sse"], required=True)
    ev.add_argument("--count", type=int, default=500)
    ev.add_argument("--prefix", default="wsbench-events")
    ev.add_argument("--pace-ms", type=float, default=5.0)
    ev.add_argument("--timeout", type=float, default=2.0)
    ev.add_argument("--body-bytes", type=int, default=100)
    a = p.parse_args()
    asyncio.run(cmd_upload(a) if a.cmd == "upload" else cmd_events(a))


if __name__ == "__main__":
    main()
