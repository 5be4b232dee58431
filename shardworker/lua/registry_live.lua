-- The members seen within the grace period; forgets long-dead ones.
--
-- KEYS[1]  members zset sw:members
-- ARGV[1]  grace period in ms
-- ARGV[2]  forget-after in ms

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
