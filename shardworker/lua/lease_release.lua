-- Release leases, deleting only those still ours.
--
-- KEYS[i]  lease key
-- ARGV[i]  our token for KEYS[i]
--
-- Returns how many were deleted.

local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
