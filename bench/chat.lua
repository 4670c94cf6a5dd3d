-- wrk script: POST one small chat request per call, then print the summary as one
-- JSON line (latencies in microseconds) for bench/common.py to read.
-- The body and the Authorization header come from BENCH_BODY and BENCH_AUTH.

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
-- As the official SDKs do: every request names its client.
wrk.headers["User-Agent"] = "OpenAI/Python 1.99.0"
local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = auth
end

-- With BENCH_USERS > 1 each request names one of that many end users in turn
-- (bench-user-0, bench-user-1, ...), as an app with many users would.
local users = tonumber(os.getenv("BENCH_USERS") or "1") or 1
local counter = 0
if users > 1 then
  request = function()
    counter = counter + 1
    local who = "bench-user-" .. (counter % users)
    local body = string.gsub(wrk.body, '"bench%-user"', '"' .. who .. '"')
    return wrk.format(nil, nil, nil, body)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"p50_us": %.0f, "p90_us": %.0f, "p99_us": %.0f, "max_us": %.0f, "mean_us": %.1f, '
      .. '"connect": %d, "read": %d, "write": %d, "timeout": %d, "status": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.timeout, e.status))
end
