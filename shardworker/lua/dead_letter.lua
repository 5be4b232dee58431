-- Dead-letter one message at most once per UID (shardworker.sink.redis_streams).
--
-- KEYS[1]  dead-letter stream (SHARDWORKER_DLQ_STREAM)
-- KEYS[2]  per-UID dedupe key sw:pub:{<provider_id>}:<folder>:<uidvalidity>:<uid>
-- KEYS[3]  lease key sw:lease:<tenant>:<provider_id>; read only when ARGV[1] ~= ''
--
-- ARGV[1]  fencing token, '' for no fence
-- ARGV[2]  dedupe key TTL in milliseconds
-- ARGV[3…] DLQ entry fields, flat name/value pairs
--
-- Returns the DLQ entry id; when the UID is already known, the id recorded for it
-- (its first DLQ entry, or its workflow stream id if it was published) and writes nothing.
-- The per-UID key is set to 'dlq:<entry id>' so publish.lua never publishes this UID.
-- Error reply 'FENCED …' when the lease is not held with this token: nothing is written.

local DLQ_MARK = 'dlq:'

if ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then
    return redis.error_reply('FENCED lease not held with this token')
end

local seen = redis.call('GET', KEYS[2])
if seen then
    if string.sub(seen, 1, #DLQ_MARK) == DLQ_MARK then
        return string.sub(seen, #DLQ_MARK + 1)
    end
    return seen
end

-- Unbounded on purpose: poison messages are rare and an operator must see every one.
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], DLQ_MARK .. id, 'PX', ARGV[2])
return id
