-- Publish one INBOUND_EMAIL_RECEIVED event exactly once (shardworker.sink.redis_streams).
--
-- The caller builds every string (JSON included); this script only decides and writes,
-- atomically, so a crash or a retried pipeline can never write an event twice.
--
-- KEYS[1]  workflow stream (workflow:events:global)
-- KEYS[2]  per-UID dedupe key    sw:pub:{<tenant>:<provider_id>}:<folder>:<uidvalidity>:<uid>
-- KEYS[3]  per-Message-ID key    sw:mid:{<tenant>:<provider_id>}:<sha1 hex of Message-ID>
--          (equal to KEYS[2] when the message has no Message-ID)
-- KEYS[4]  lease key sw:lease:<tenant>:<provider_id>; read only when ARGV[1] ~= ''
-- KEYS[5]  event-bus stream; written only when ARGV[4] == '1'
-- KEYS[6]  pointer queue list; written only when ARGV[5] == '1'. LPUSH, where Alga's own
--          producer RPUSHes: Alga's claim takes with RPOPLPUSH (from the tail), so pushing
--          at the head makes the list a FIFO and a reply is claimed after its original.
--
-- ARGV[1]  fencing token, '' for no fence
-- ARGV[2]  approximate MAXLEN of both streams
-- ARGV[3]  dedupe key TTL in milliseconds
-- ARGV[4]  '1' to XADD the event-bus stream
-- ARGV[5]  '1' to LPUSH the pointer job
-- ARGV[6]  event-bus `event` field (JSON), '' when unused
-- ARGV[7]  pointer job (JSON), '' when unused
-- ARGV[8…] workflow stream fields, flat name/value pairs in Alga's order
--
-- Returns {stream_id, status}: status 0 = written now, 1 = duplicate (the original id),
-- 2 = the UID was dead-lettered (stream_id is then the DLQ entry id).
-- Error reply 'FENCED …' when the lease is not held with this token: nothing is written.
-- Error reply 'BADARG …' / 'WRONGTYPE …' before the first write when an argument or a key
-- could make a later command fail: Lua does not roll back, so a failure after the XADD
-- would leave an event without its dedupe keys, and every retry would publish it again.

local DLQ_MARK = 'dlq:'
local MAX_TTL_MS = 315360000000  -- ten years; PX near the clock's end fails in Redis

local function is_count(value)
    return string.match(value, '^%d+$') ~= nil and #value <= 15
end

local function check_type(key, expected)
    local kind = redis.call('TYPE', key)['ok']
    if kind ~= 'none' and kind ~= expected then
        return redis.error_reply('WRONGTYPE ' .. key .. ' is a ' .. kind .. ', not a ' .. expected)
    end
    return nil
end

if ARGV[1] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[1] then
    return redis.error_reply('FENCED lease not held with this token')
end

if not is_count(ARGV[2]) then
    return redis.error_reply('BADARG MAXLEN must be a whole number below 10^15')
end
local ttl = tonumber(ARGV[3])
if not is_count(ARGV[3]) or ttl < 1 or ttl > MAX_TTL_MS then
    return redis.error_reply('BADARG dedupe TTL must be 1..' .. MAX_TTL_MS .. ' ms')
end

local seen = redis.call('GET', KEYS[2])
if seen then
    if string.sub(seen, 1, #DLQ_MARK) == DLQ_MARK then
        return {string.sub(seen, #DLQ_MARK + 1), 2}
    end
    return {seen, 1}
end

-- The same message filed in another folder (or copied) is the same event.
seen = redis.call('GET', KEYS[3])
if seen then
    redis.call('SET', KEYS[2], seen, 'PX', ARGV[3])
    return {seen, 1}
end

local bad = check_type(KEYS[1], 'stream')
    or (ARGV[4] == '1' and check_type(KEYS[5], 'stream'))
    or (ARGV[5] == '1' and check_type(KEYS[6], 'list'))
if bad then
    return bad
end

local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 8))
if ARGV[4] == '1' then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[2], '*',
               'event', ARGV[6], 'channel', 'global')
end
if ARGV[5] == '1' then
    redis.call('LPUSH', KEYS[6], ARGV[7])
end
redis.call('SET', KEYS[2], id, 'PX', ARGV[3])
redis.call('SET', KEYS[3], id, 'PX', ARGV[3])
return {id, 0}
