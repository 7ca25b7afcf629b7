-- wrk script used by bench/serve.sh.
--
--   wrk ... -s bench/ranges.lua URL -- LEN SIZE
--
-- LEN > 0: every request asks for `Range: bytes=a-(a+LEN-1)` at a random
-- offset a in [0, SIZE-LEN]. LEN = 0: plain GET of the whole resource.
-- done() prints one machine-readable "RESULT ..." line that serve.sh parses.

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

local len, size

function init(args)
  len = tonumber(args[1]) or 0
  size = tonumber(args[2]) or 0
  math.randomseed(os.time() * 1000 + (id or 0) * 7919)
  -- discard the first values: LuaJIT's generator starts poorly mixed
  for _ = 1, 10 do math.random() end
end

function request()
  if len <= 0 then
    return wrk.format("GET")
  end
  local a = math.random(0, size - len)
  return wrk.format("GET", nil, { ["Range"] = string.format("bytes=%d-%d", a, a + len - 1) })
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d bytes=%d secs=%.3f req_s=%.1f mb_s=%.1f "
      .. "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d "
      .. "p50_ms=%.2f p99_ms=%.2f\n",
    summary.requests, summary.bytes, secs,
    summary.requests / secs, summary.bytes / secs / 1e6,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
