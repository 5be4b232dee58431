-- Publish one INBOUND_EMAIL_RECEIVED event exactly once (shardworker.sink.redis_streams).
--
-- The caller builds every string (JSON included); this script only decides and writes,
-- atomically, so a crash or a retried pipeline can never write an event twice.
--
-- KEYS[1]  workflow stream (workflow:events:global)
-- KEYS[2]  per-UID dedupe key    sw:pub:{<provider_id>}:<folder>:<uidvalidity>:<uid>
-- KEYS[3]  per-Message-ID key    sw:mid:{<provider_id>}:<sha1 hex of Message-ID>
--          (equal to KEYS[2] when the message has no Message-ID)
-- KEYS[4]  lease key sw:lease:<tenant>:<provider_id>; read only when ARGV[1] ~= ''
-- KEYS[5]  event-bus stream; written only when ARGV[4] == '1'
-- KEYS[6]  pointer queue list; written only when ARGV[5] == '1'
--
-- ARGV[1]  fencing token, '' for no fence
-- ARGV[2]  approximate MAXLEN of both streams
-- ARGV[3]  dedupe key TTL in milliseconds
-- ARGV[4]  '1' to XADD the event-bus stream
-- ARGV[5]  '1' to RPUSH the pointer job
-- ARGV[6]  event-bus `event` field (JSON), '' when unused
-- ARGV[7]  pointer job (JSON), '' when unused
-- ARGV[8…] workflow stream fields, flat name/value pairs in Alga's order
--
-- Returns {stream_id, status}: status 0 = written now, 1 = duplicate (the original id),
-- 2 = the UID was dead-lettered (stream_id is then the DLQ entry id).
-- Error reply 'FENCED …' when the lease is not held with this token: nothing is written.

local DLQ_MARK = 'dlq:'

if ARGV[1] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[1] then
    return redis.error_reply('FENCED lease not held with this token')
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

local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 8))
if ARGV[4] == '1' then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[2], '*',
               'event', ARGV[6], 'channel', 'global')
end
if ARGV[5] == '1' then
    redis.call('RPUSH', KEYS[6], ARGV[7])
end
redis.call('SET', KEYS[2], id, 'PX', ARGV[3])
redis.call('SET', KEYS[3], id, 'PX', ARGV[3])
return {id, 0}
