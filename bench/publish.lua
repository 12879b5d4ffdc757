-- wrk script of bench/publish.py: POST fixed JSON bodies, as fast as the connections allow.
--
--   PUBLISH_BODY_FILE=body.json wrk -t1 -c32 -d10s -s bench/publish.lua http://127.0.0.1:8000/publish
--
-- The bodies are read from the file named by PUBLISH_BODY_FILE, one per line (bench/publish.py
-- writes a single publish or a batch there, or with --subscribers N, N single publishes, one per
-- topic). One body is sent as wrk's fixed request; several are sent in turn by each wrk
-- thread. At the end one line starting with "BENCH-JSON " holds the summary
-- that bench/publish.py parses (wrk's own report is printed above it).

local bodies = {}
local path = os.getenv("PUBLISH_BODY_FILE")
if path then
  local file = assert(io.open(path, "rb"))
  for line in file:read("*a"):gmatch("[^\n]+") do
    bodies[#bodies + 1] = line
  end
  file:close()
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if #bodies == 1 then
  wrk.body = bodies[1]
elseif #bodies > 1 then
  -- Each wrk thread (one Lua state each) sends the bodies in turn over its connections.
  local prepared, last = {}, 0

  function init(args)
    for i, b in ipairs(bodies) do
      prepared[i] = wrk.format(nil, nil, nil, b)
    end
  end

  function request()
    last = last % #prepared + 1
    return prepared[last]
  end
end

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
