-- wrk script for bench/serve_latency.py's maximum-throughput runs.
--
-- Each thread cycles through the request targets in the file named by $TARGETS
-- (one per line, from its own starting line), counts the answers by status and
-- a recommendation's by its path (and fallback reason, `fallback:budget`), as
-- bench/_serve_load.py does, and `done` prints one JSON line with the figures
-- that generator reports.

local targets, next_target = {}, 0
statuses, paths = {}, {}

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  threads[#threads + 1] = thread
end

function init(args)
  for line in io.lines(os.getenv("TARGETS")) do
    targets[#targets + 1] = line
  end
  next_target = (id * 7919) % #targets
end

function request()
  next_target = next_target % #targets + 1
  return wrk.format("GET", targets[next_target])
end

function response(status, headers, body)
  local s = tostring(status)
  statuses[s] = (statuses[s] or 0) + 1
  local path, reason = body:match('"path":"([%w_]+)","reason":([%w_"]+)')
  if path then
    if reason ~= "null" then path = path .. ":" .. reason:gsub('"', "") end
    paths[path] = (paths[path] or 0) + 1
  end
end

local function add_into(total, part)
  for k, v in pairs(part) do total[k] = (total[k] or 0) + v end
end

local function object(t)
  local out = {}
  for k, v in pairs(t) do out[#out + 1] = string.format('"%s": %d', k, v) end
  return "{" .. table.concat(out, ", ") .. "}"
end

function done(summary, latency, requests)
  local all_statuses, all_paths = {}, {}
  for _, thread in ipairs(threads) do
    add_into(all_statuses, thread:get("statuses"))
    add_into(all_paths, thread:get("paths"))
  end
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.6f, "failed": %d, "timeouts": %d, "statuses": %s, "paths": %s, ' ..
    '"p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "p999_ms": %.3f, "max_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write, e.timeout,
    object(all_statuses), object(all_paths),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000))
end
