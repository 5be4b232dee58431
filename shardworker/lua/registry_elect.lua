-- Renew our leader lease, or take a free one with a new epoch.
--
-- KEYS[1]  leader lease sw:leader
-- KEYS[2]  leader epoch counter sw:leader:epoch
-- ARGV[1]  coordinator identity
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  the token we hold ('' if none)
--
-- Returns the token held after the call, or false.

local cur = redis.call('GET', KEYS[1])
if cur and cur == ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
if cur then
  return false
end
local epoch = redis.call('INCR', KEYS[2])
local token = ARGV[1] .. '|' .. epoch
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
