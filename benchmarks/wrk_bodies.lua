-- wrk script for benchmarks/bench_gateway.py: POST the image set's JPEG bodies in turn, count non-2xx,
-- and print one machine-readable JSON line at the end.
--
--   wrk -t1 -c4 -d6s --timeout 10s -s benchmarks/wrk_bodies.lua http://127.0.0.1:8080/v1/detect -- bodies.txt
--
-- bodies.txt lists one file per line (absolute paths); every connection of a thread walks the same
-- cycle, each thread starting at its own offset. Requests are formatted once, in init().

local requests = {}
local index = 0
non2xx = 0      -- globals: read from done() through thread:get()
statuses = ""   -- "503 429 ..." (first 50 non-2xx codes), a string so it crosses Lua states as-is
local threads = {}
local thread_count = 0

function setup(thread)
  thread:set("thread_id", thread_count)
  thread_count = thread_count + 1
  table.insert(threads, thread)
end

function init(args)
  local list = args[1] or error("usage: wrk ... -s wrk_bodies.lua URL -- BODY_LIST_FILE")
  local headers = { ["Content-Type"] = "image/jpeg", ["Accept"] = "application/json" }
  for path in io.lines(list) do
    if path ~= "" then
      local file = assert(io.open(path, "rb"))
      local body = file:read("*a")
      file:close()
      table.insert(requests, wrk.format("POST", nil, headers, body))
    end
  end
  if #requests == 0 then error("no bodies listed in " .. list) end
  index = (thread_id or 0) % #requests
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if non2xx <= 50 then statuses = statuses .. status .. " " end
  end
end

function done(summary, latency, requests)
  local bad, codes = 0, ""
  for _, thread in ipairs(threads) do
    bad = bad + (thread:get("non2xx") or 0)
    codes = codes .. (thread:get("statuses") or "")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "non2xx": %d, "non2xx_codes": "%s", ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"min": %d, "max": %d, "mean": %.1f, "stdev": %.1f, "p50": %d, "p90": %d, "p95": %d, "p99": %d}}\n',
    summary.requests, summary.duration, summary.bytes, bad, (codes:gsub("%s+$", "")),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99)))
end
