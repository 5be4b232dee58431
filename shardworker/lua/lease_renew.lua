-- Extend the leases still ours.
--
-- KEYS[i]    lease key
-- ARGV[1]    TTL in milliseconds
-- ARGV[i+1]  the token we believe we hold in KEYS[i]
--
-- Returns 1/0 per key (0 = lost).

local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
