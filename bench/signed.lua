-- wrk script: every request is a Standard Webhooks-signed POST with a unique webhook-id.
-- HMAC-SHA256 and base64 come from the libcrypto wrk already links (LuaJIT FFI), so the
-- signature is computed per request at C speed; nothing is pre-generated and ids never repeat.
-- Arguments after `--`: <run tag> <hex HMAC key> <body bytes>.
local ffi = require("ffi")
ffi.cdef [[
typedef struct evp_md_st EVP_MD;
const EVP_MD *EVP_sha256(void);
unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len,
                    const unsigned char *d, size_t n, unsigned char *md, unsigned int *md_len);
int EVP_EncodeBlock(unsigned char *t, const unsigned char *f, int n);
]]
local C = ffi.C

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

local tag, key, pad, md, mdlen, b64, sha
generated = 0  -- global so done() can read it through thread:get
local prefix = '{"type":"bench.event","timestamp":"2026-01-01T00:00:00Z","data":{"id":"'

function init(args)
  tag = args[1] or "run"
  local hex = args[2]
  key = hex:gsub("..", function(cc) return string.char(tonumber(cc, 16)) end)
  local size = tonumber(args[3] or "1024")
  pad = string.rep("x", math.max(0, size - #prefix - 40))
  md = ffi.new("unsigned char[32]")
  mdlen = ffi.new("unsigned int[1]")
  b64 = ffi.new("unsigned char[64]")
  sha = C.EVP_sha256()
end

function request()
  generated = generated + 1
  local id = "msg_" .. tag .. "_" .. tid .. "_" .. generated
  local ts = tostring(os.time())
  local body = prefix .. id .. '","pad":"' .. pad .. '"}}'
  local signed = id .. "." .. ts .. "." .. body
  C.HMAC(sha, key, #key, signed, #signed, md, mdlen)
  local len = C.EVP_EncodeBlock(b64, md, 32)
  local headers = {
    ["Content-Type"] = "application/json",
    ["webhook-id"] = id,
    ["webhook-timestamp"] = ts,
    ["webhook-signature"] = "v1," .. ffi.string(b64, len),
  }
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local sent = 0
  for _, t in ipairs(threads) do sent = sent + (t:get("generated") or 0) end
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"errors_connect":%d,"errors_read":%d,"errors_write":%d,' ..
    '"errors_status":%d,"errors_timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"generated":%d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, sent))
end
