-- Dead-letter one message at most once per UID, in a bounded stream
-- (shardworker.sink.redis_streams).
--
-- KEYS[1]  dead-letter stream (SHARDWORKER_DLQ_STREAM)
-- KEYS[2]  per-UID dedupe key sw:pub:{<tenant>:<provider_id>}:<folder>:<uidvalidity>:<uid>
-- KEYS[3]  lease key sw:lease:<tenant>:<provider_id>; read only when ARGV[1] ~= ''
-- KEYS[4]  byte counter of the stream (<dlq stream>:bytes): the sum of the field sizes of
--          the entries it holds, recounted from the stream when missing (evicted, restarted)
--
-- ARGV[1]  fencing token, '' for no fence
-- ARGV[2]  dedupe key TTL in milliseconds
-- ARGV[3]  most entries the stream keeps (SHARDWORKER_DLQ_MAX_ENTRIES, >= 1)
-- ARGV[4]  most field bytes the stream keeps (SHARDWORKER_DLQ_MAX_BYTES, >= 1)
-- ARGV[5…] DLQ entry fields, flat name/value pairs
--
-- Returns {entry id, entries trimmed}.  When the UID is already known: the id recorded for
-- it (its first DLQ entry, or its workflow stream id if it was published), 0, and writes
-- nothing.  The per-UID key is set to 'dlq:<entry id>' so publish.lua never publishes this
-- UID.  The oldest entries make room, by count and by bytes, so a server that dead-letters
-- every UID cannot fill the Redis that Alga shares; the caller logs and counts what went.
-- Error reply 'FENCED …' when the lease is not held with this token: nothing is written.
-- Error reply 'BADARG …' before the first write when a bound is not a positive count.

local DLQ_MARK = 'dlq:'
local RECOUNT_CHUNK = 100

local function is_count(value)
    return string.match(value, '^%d+$') ~= nil and #value <= 15 and tonumber(value) >= 1
end

local function entry_bytes(fields)
    local size = 0
    for _, value in ipairs(fields) do
        size = size + #value
    end
    return size
end

-- The counter of a stream whose counter was lost: read it back in chunks.
local function recount(stream)
    local total, start = 0, '-'
    while true do
        local entries = redis.call('XRANGE', stream, start, '+', 'COUNT', RECOUNT_CHUNK)
        for _, entry in ipairs(entries) do
            total = total + entry_bytes(entry[2])
        end
        if #entries < RECOUNT_CHUNK then
            return total
        end
        start = '(' .. entries[#entries][1]
    end
end

if ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then
    return redis.error_reply('FENCED lease not held with this token')
end
if not is_count(ARGV[2]) or not is_count(ARGV[3]) or not is_count(ARGV[4]) then
    return redis.error_reply('BADARG TTL, entry and byte bounds must be whole numbers >= 1')
end

local seen = redis.call('GET', KEYS[2])
if seen then
    if string.sub(seen, 1, #DLQ_MARK) == DLQ_MARK then
        return {string.sub(seen, #DLQ_MARK + 1), 0}
    end
    return {seen, 0}
end

local max_entries, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local fields = {unpack(ARGV, 5)}
local size = entry_bytes(fields)
local total = tonumber(redis.call('GET', KEYS[4]) or '')
if total == nil then
    total = recount(KEYS[1])
end

local trimmed = 0
local length = redis.call('XLEN', KEYS[1])
while length > 0 and (length >= max_entries or total + size > max_bytes) do
    local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
    total = total - entry_bytes(oldest[2])
    redis.call('XDEL', KEYS[1], oldest[1])
    length = length - 1
    trimmed = trimmed + 1
end

local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('SET', KEYS[4], math.max(0, total) + size)
redis.call('SET', KEYS[2], DLQ_MARK .. id, 'PX', ARGV[2])
return {id, trimmed}
