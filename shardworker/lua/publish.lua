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
-- KEYS[7]  the sender's rate window, a sorted set sw:loop:{<tenant>:<provider_id>}:<sha1>
--          (shardworker.loopguard); read and written only when ARGV[8] ~= '0'
-- KEYS[8]  its "tripped" marker (KEYS[7] .. ':tripped'), same condition
--
-- ARGV[1]  fencing token, '' for no fence
-- ARGV[2]  approximate MAXLEN of both streams
-- ARGV[3]  dedupe key TTL in milliseconds
-- ARGV[4]  '1' to XADD the event-bus stream
-- ARGV[5]  '1' to LPUSH the pointer job
-- ARGV[6]  event-bus `event` field (JSON), '' when unused
-- ARGV[7]  pointer job (JSON), '' when unused
-- ARGV[8]  the sender's rate limit (messages per window), '0' for no rate check
-- ARGV[9]  the rate window in milliseconds
-- ARGV[10] now, in milliseconds since the epoch
-- ARGV[11] the message's identity in the rate window (its dedupe key)
-- ARGV[12…] workflow stream fields, flat name/value pairs in Alga's order
--
-- Returns {stream_id, status, rank, first_trip}: status 0 = written now, 1 = duplicate
-- (the original id), 2 = the UID was dead-lettered (stream_id is then the DLQ entry id),
-- 3 = held by the rate check: nothing written but the rate marker, stream_id ''.
-- rank is the message's rank among the sender's counted messages (the limit when held,
-- 0 without a rate check); first_trip 1 when this is the window's first hold.
--
-- The rate check is loopguard.HIT, made here so that it costs no round trip of its own:
-- counted before the dedupe keys are read, as the guard was asked before the publish.
-- Only messages that are admitted are counted, so the window never holds more than the
-- limit, and a message counted before (a retried batch) gets the answer it got then.
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

local function check_types(rated)
    return check_type(KEYS[1], 'stream')
        or (ARGV[4] == '1' and check_type(KEYS[5], 'stream'))
        or (ARGV[5] == '1' and check_type(KEYS[6], 'list'))
        or (rated and (check_type(KEYS[7], 'zset') or check_type(KEYS[8], 'string')))
end

-- loopguard.HIT: {rank, first_trip}; held when rank == limit.
local function rate_hit(limit, window, now, member)
    redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - window)
    local rank = redis.call('ZRANK', KEYS[7], member)
    if rank then
        return rank, 0
    end
    local count = redis.call('ZCARD', KEYS[7])
    if count < limit then
        redis.call('ZADD', KEYS[7], now, member)
        redis.call('PEXPIRE', KEYS[7], window)
        return count, 0
    end
    local first = 0
    if redis.call('SET', KEYS[8], '1', 'NX', 'PX', window) then
        first = 1
    end
    return limit, first
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

local rated = ARGV[8] ~= '0'
local rank, first = 0, 0
if rated then
    local window = tonumber(ARGV[9])
    if not is_count(ARGV[8]) or not is_count(ARGV[10]) or not is_count(ARGV[9])
            or window < 1 or window > MAX_TTL_MS then
        return redis.error_reply('BADARG rate limit, window (1..' .. MAX_TTL_MS
                                 .. ' ms) and now must be whole numbers')
    end
    -- The rate check writes: every later step that could fail is checked before it.
    local bad = check_types(true)
    if bad then
        return bad
    end
    local limit = tonumber(ARGV[8])
    rank, first = rate_hit(limit, window, tonumber(ARGV[10]), ARGV[11])
    if rank >= limit then
        return {'', 3, rank, first}
    end
end

local seen = redis.call('GET', KEYS[2])
if seen then
    if string.sub(seen, 1, #DLQ_MARK) == DLQ_MARK then
        return {string.sub(seen, #DLQ_MARK + 1), 2, rank, 0}
    end
    return {seen, 1, rank, 0}
end

-- The same message filed in another folder (or copied) is the same event.
seen = redis.call('GET', KEYS[3])
if seen then
    redis.call('SET', KEYS[2], seen, 'PX', ARGV[3])
    return {seen, 1, rank, 0}
end

if not rated then
    local bad = check_types(false)
    if bad then
        return bad
    end
end

local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 12))
if ARGV[4] == '1' then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[2], '*',
               'event', ARGV[6], 'channel', 'global')
end
if ARGV[5] == '1' then
    redis.call('LPUSH', KEYS[6], ARGV[7])
end
redis.call('SET', KEYS[2], id, 'PX', ARGV[3])
redis.call('SET', KEYS[3], id, 'PX', ARGV[3])
return {id, 0, rank, 0}
