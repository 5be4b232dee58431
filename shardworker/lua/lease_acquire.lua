-- Take free provider leases (shardworker.pool.leases, step 1 of an acquisition).
--
-- KEYS[i]    lease key sw:lease:<tenant>:<provider_id>
-- ARGV[1]    TTL in milliseconds
-- ARGV[i+1]  the provisional token for KEYS[i]
--
-- Returns one 1/0 per key: 1 when the key was free and is now ours.

local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[i + 1], 'NX', 'PX', ARGV[1]) then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
