-- wrk script of bench/publish.py: POST one fixed JSON body, as fast as the connections allow.
--
--   PUBLISH_BODY_FILE=body.json wrk -t1 -c32 -d10s -s bench/publish.lua http://127.0.0.1:8000/publish
--
-- The body is read from the file named by PUBLISH_BODY_FILE (bench/publish.py writes a single
-- publish or a batch there). At the end one line starting with "BENCH-JSON " holds the summary
-- that bench/publish.py parses (wrk's own report is printed above it).

local path = os.getenv("PUBLISH_BODY_FILE")
if path then
  local file = assert(io.open(path, "rb"))
  wrk.body = file:read("*a")
  file:close()
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH-JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, '
      .. '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, '
      .. '"p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max
  ))
end
