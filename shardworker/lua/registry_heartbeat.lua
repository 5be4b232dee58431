-- A member's heartbeat, stamped with Redis's own clock (shardworker.pool.registry).
--
-- KEYS[1]  members zset sw:members
-- KEYS[2]  PostgreSQL zset sw:members:db: member -> when its PostgreSQL probe last
--          succeeded, in Redis's clock; written only when ARGV[2] ~= ''
-- ARGV[1]  member id
-- ARGV[2]  how long ago (ms) the member's last PostgreSQL probe succeeded, or ''
--
-- Returns the stamp (ms).

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
if ARGV[2] ~= '' then
    redis.call('ZADD', KEYS[2], now - tonumber(ARGV[2]), ARGV[1])
end
return now
