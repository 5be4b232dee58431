-- Publish an assignment, only while still the leader.
--
-- KEYS[1]    leader lease
-- KEYS[2]    sw:assignment
-- KEYS[3..]  sw:assign:<member> keys
-- ARGV[1]    leader token
-- ARGV[2]    assignment JSON
-- ARGV[3..#KEYS]  one JSON per member key (ARGV[i] for KEYS[i])
-- ARGV[#KEYS+1]   how many member keys to delete, followed by those keys
--
-- Returns 1, or the error NOTLEADER.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER')
end
redis.call('SET', KEYS[2], ARGV[2])
for i = 3, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i])
end
local n = tonumber(ARGV[#KEYS + 1])
for i = 1, n do
  redis.call('DEL', ARGV[#KEYS + 1 + i])
end
return 1
