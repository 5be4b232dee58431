-- Apply one chunk of an assignment delta, only while still the leader.
--
-- KEYS[1]  leader lease
-- ARGV[1]  leader token
-- ARGV[2..]  operations, each an opcode followed by its operands:
--   hset <key> <field> <value>   (an owner shard entry, a member's version, the meta)
--   hdel <key> <field>
--   sadd <key> <member>          (a member's share)
--   srem <key> <member>
--   del  <key>
--   note <key> <version>         (XADD to a member's note stream, kept to its last 8)
--
-- The keys written are the registry's own (sw:owners:*, sw:assign:*, sw:assignnote:*,
-- sw:assignver, sw:assignment);
-- they are not declared in KEYS, which a single Redis (the supported deployment) allows.
-- Returns the number of operations applied, or the error NOTLEADER.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER')
end
local i, n = 2, 0
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'hset' then
    redis.call('HSET', ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'hdel' then
    redis.call('HDEL', ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  elseif op == 'sadd' then
    redis.call('SADD', ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  elseif op == 'srem' then
    redis.call('SREM', ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  elseif op == 'del' then
    redis.call('DEL', ARGV[i + 1])
    i = i + 2
  elseif op == 'note' then
    redis.call('XADD', ARGV[i + 1], 'MAXLEN', '8', '*', 'version', ARGV[i + 2])
    i = i + 3
  else
    return redis.error_reply('BADOP ' .. tostring(op))
  end
  n = n + 1
end
return n
