-- A member's heartbeat, stamped with Redis's own clock (shardworker.pool.registry).
--
-- KEYS[1]  members zset sw:members
-- ARGV[1]  member id
--
-- Returns the stamp (ms).

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
return now
