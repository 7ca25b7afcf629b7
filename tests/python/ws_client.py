"""An independent ferry.v1 client, written from docs/PROTOCOL.md alone.

Usage: ws_client.py SERVER_URL FILE REMOTE_PATH
Uploads FILE in out-of-order chunks over the WebSocket, checks the progress
messages, completes, downloads it back and checks the bytes. Exits non-zero
on any mismatch.
"""

import asyncio
import json
import struct
import sys

import websockets

CHUNK = 1 << 20


def crc32c(data: bytes) -> int:
    table = crc32c.table
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _table():
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        out.append(c)
    return out


crc32c.table = _table()


def frame(ch: int, offset: int, payload: bytes) -> bytes:
    return struct.pack(">IQI", ch, offset, crc32c(payload)) + payload


async def next_text(ws):
    while True:
        msg = await ws.recv()
        if isinstance(msg, str):
            return json.loads(msg)


async def main(url: str, path: str, remote: str) -> None:
    data = open(path, "rb").read()
    ws_url = url.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(ws_url, subprotocols=["ferry.v1"], max_size=None) as ws:
        assert ws.subprotocol == "ferry.v1", ws.subprotocol
        await ws.send(json.dumps({"op": "upload.create", "ch": 5, "path": remote,
                                  "size": len(data), "chunk_size": CHUNK}))
        ready = await next_text(ws)
        assert ready["op"] == "ready" and ready["ch"] == 5, ready
        count = ready["chunk_count"]
        assert count == (len(data) + CHUNK - 1) // CHUNK, ready
        order = list(range(count))[::-1]  # last chunk first
        order = order[1::2] + order[::2]  # and interleaved
        for index in order:
            await ws.send(frame(5, index * CHUNK, data[index * CHUNK:(index + 1) * CHUNK]))
        acked, last_progress = set(), None
        while len(acked) < count:
            msg = await next_text(ws)
            if msg["op"] == "ack":
                acked.add(msg["index"])
            elif msg["op"] == "progress":
                last_progress = msg
            else:
                raise AssertionError(f"unexpected {msg}")
        # The progress that follows the last ack.
        while last_progress is None or last_progress["chunks_received"] < count:
            last_progress = await next_text(ws)
        assert last_progress["bytes_received"] == len(data), last_progress
        await ws.send(json.dumps({"op": "upload.complete", "ch": 5}))
        done = await next_text(ws)
        assert done["op"] == "done" and done["meta"]["size"] == len(data), done

        await ws.send(json.dumps({"op": "download", "ch": 9, "path": remote}))
        received = bytearray()
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                ch, offset, crc = struct.unpack(">IQI", msg[:16])
                payload = msg[16:]
                assert ch == 9 and offset == len(received), (ch, offset)
                assert crc == crc32c(payload), "download frame CRC"
                assert len(payload) <= CHUNK
                received += payload
            else:
                eof = json.loads(msg)
                assert eof["op"] == "eof" and eof["ch"] == 9, eof
                break
        assert bytes(received) == data, "downloaded bytes differ"
    print("ok", len(data))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
