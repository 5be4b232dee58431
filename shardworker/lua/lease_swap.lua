-- Swap provisional lease tokens for final ones (step 3 of an acquisition).
--
-- KEYS[i]     lease key
-- ARGV[1]     TTL in milliseconds
-- ARGV[2i]    the token expected in KEYS[i] (the provisional one)
-- ARGV[2i+1]  the new token <member>|<epoch>
--
-- Swaps (and restarts the TTL) only where the expected token is still there; 1/0 per key.

local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[2 * i] then
    redis.call('SET', key, ARGV[2 * i + 1], 'PX', ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
