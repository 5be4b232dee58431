-- Renew every lease a member holds, from the member's own record in Redis: one call whose
-- size does not grow with the number of leases.
--
-- KEYS[1]  sw:held:<member>, HASH lease key -> token (written after each acquisition)
-- ARGV[1]  TTL in milliseconds
--
-- A lease whose value is no longer the token is lost: it leaves the record.
-- Returns {renewed count, lost lease key, ...}.  The lease keys are not declared in KEYS,
-- which a single Redis (the supported deployment) allows.

local held = redis.call('HGETALL', KEYS[1])
local out = {0}
for i = 1, #held, 2 do
  local key, token = held[i], held[i + 1]
  if redis.call('GET', key) == token then
    redis.call('PEXPIRE', key, ARGV[1])
    out[1] = out[1] + 1
  else
    redis.call('HDEL', KEYS[1], key)
    out[#out + 1] = key
  end
end
return out
