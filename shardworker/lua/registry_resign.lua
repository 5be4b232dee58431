-- Step down without waiting for the TTL.
--
-- KEYS[1]  leader lease
-- ARGV[1]  our token
--
-- Returns 1 when deleted, 0 when not ours.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
