-- Switchboard rate limits, concurrency leases and budgets: one script, one atomic round trip per call.
-- ARGV[1] names the operation, ARGV[2] is now in ms or "" for the server clock (production passes "";
-- tests pass a clock). Every reply is a flat array of integers, so client decoding settings do not matter.
-- gateway/limits/base.py holds the Python twin of each operation (MemoryLimiter); keep the two in step.

local op = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

local function ceil0(x)
  if x <= 0 then return 0 end
  return math.ceil(x)
end

-- GCRA in continuous time, on a clock of whole microseconds (exact in doubles). A rule's state is its
-- theoretical arrival time (TAT); a charge of c units moves it by c emission intervals (window/limit), rounded
-- down to a whole us so a burst of exactly `limit` fits, and fits while the TAT stays within one window of
-- now: no boundary lets one more through. Key names carry limit and window. Python twin: gcra_step,
-- rule_status and gcra_retry_ms in base.py, the same double arithmetic step by step.
-- ARGV per rule i: limit, window_ms, cost. Charges every rule or none.
-- Reply: allowed, retry_ms (-1: the cost exceeds a limit, never fits), then per rule: remaining, reset_ms, fits.
local now_us = math.floor(now * 1000)

local function admit()
  local tats, replies, allowed, retry = {}, {}, 1, 0
  for i = 1, #KEYS do
    local limit = tonumber(ARGV[3 * i])
    local window = tonumber(ARGV[3 * i + 1]) * 1000
    local cost = tonumber(ARGV[3 * i + 2])
    local tat = math.max(tonumber(redis.call('GET', KEYS[i])) or 0, now_us)
    local new_tat = tat + math.floor(cost * window / limit)
    local fits = 1
    if cost > limit then
      fits, allowed, retry = 0, 0, -1
    elseif new_tat - now_us > window then
      fits, allowed = 0, 0
      if retry >= 0 then retry = math.max(retry, 1, ceil0((new_tat - window - now_us) / 1000)) end
    end
    tats[i] = {tat, new_tat, limit, window}
    replies[i] = fits
  end
  local out = {allowed, retry}
  for i = 1, #KEYS do
    local tat, new_tat, limit, window = unpack(tats[i])
    if allowed == 1 then
      tat = new_tat
      redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX', ceil0((tat - now_us) / 1000) + 1)
    end
    local ahead = math.max(0, tat - now_us)
    table.insert(out, math.min(limit, math.max(0, math.floor((window - ahead) * limit / window))))
    table.insert(out, ceil0(ahead / 1000))
    table.insert(out, replies[i])
  end
  return out
end

-- Correct a charge: ARGV per rule i: limit, window_ms, delta in units (actual - charged; negative refunds).
-- A key that has already expired has nothing left to refund.
local function settle()
  for i = 1, #KEYS do
    local limit, window = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1]) * 1000
    local tat = math.max(tonumber(redis.call('GET', KEYS[i])) or 0, now_us)
    tat = tat + math.floor(tonumber(ARGV[3 * i + 2]) * window / limit)
    if tat > now_us then
      redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX', ceil0((tat - now_us) / 1000) + 1)
    else
      redis.call('DEL', KEYS[i])
    end
  end
  return {1}
end

-- Concurrency: a sorted set of lease ids scored by expiry, so a crashed replica's slots come back.
-- ARGV: limit, lease_id, ttl_ms. Reply: acquired, in_flight (after this call).
local function acquire()
  local limit, lease, ttl = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local n = redis.call('ZCARD', KEYS[1])
  if n >= limit then return {0, n} end
  redis.call('ZADD', KEYS[1], now + ttl, lease)
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
  return {1, n + 1}
end

-- Budgets: per (scope, period) a hash {spent, reserved, r:<id> = estimate} and a sorted set of
-- reservation ids scored by expiry; an expired reservation (its replica died) is released on the next call.
local function sweep(h, z)
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, 100)
  for _, id in ipairs(expired) do
    local amount = tonumber(redis.call('HGET', h, 'r:' .. id))
    if amount then
      redis.call('HINCRBY', h, 'reserved', string.format('%d', -amount))
      redis.call('HDEL', h, 'r:' .. id)
    end
    redis.call('ZREM', z, id)
  end
end

-- KEYS: hash, zset per rule. ARGV: estimate, res_id, ttl_ms, then per rule: limit, keep_ms (counter TTL).
-- Reply: allowed, then per rule: spent, reserved (including this reservation when allowed), fits.
local function reserve()
  local estimate, id, ttl = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
  local rows, allowed = {}, 1
  for i = 1, #KEYS / 2 do
    local h, z = KEYS[2 * i - 1], KEYS[2 * i]
    sweep(h, z)
    local spent = tonumber(redis.call('HGET', h, 'spent')) or 0
    local reserved = tonumber(redis.call('HGET', h, 'reserved')) or 0
    local fits = 1
    if spent + reserved + estimate > tonumber(ARGV[4 + 2 * i]) then fits, allowed = 0, 0 end
    rows[i] = {spent, reserved, fits}
  end
  local out = {allowed}
  for i = 1, #KEYS / 2 do
    local h, z = KEYS[2 * i - 1], KEYS[2 * i]
    if allowed == 1 then
      rows[i][2] = redis.call('HINCRBY', h, 'reserved', ARGV[3])
      redis.call('HSET', h, 'r:' .. id, ARGV[3])
      redis.call('ZADD', z, now + ttl, id)
      redis.call('PEXPIRE', h, ARGV[5 + 2 * i])
      redis.call('PEXPIRE', z, ARGV[5 + 2 * i])
    end
    for _, v in ipairs(rows[i]) do table.insert(out, v) end
  end
  return out
end

-- KEYS: hash, zset per rule. ARGV: actual, res_id, then per rule: keep_ms.
-- Reply per rule: spent before, spent after.
local function settle_budget()
  local actual, id = tonumber(ARGV[3]), ARGV[4]
  local out = {}
  for i = 1, #KEYS / 2 do
    local h, z = KEYS[2 * i - 1], KEYS[2 * i]
    local amount = tonumber(redis.call('HGET', h, 'r:' .. id))
    if amount then
      redis.call('HINCRBY', h, 'reserved', string.format('%d', -amount))
      redis.call('HDEL', h, 'r:' .. id)
    end
    redis.call('ZREM', z, id)
    local after = redis.call('HINCRBY', h, 'spent', ARGV[3])
    redis.call('PEXPIRE', h, ARGV[4 + i])
    table.insert(out, after - actual)
    table.insert(out, after)
  end
  return out
end

-- Rebuild from the SQL ledger: spent = max(spent, ARGV[3]) (a live counter may already be ahead of the
-- ledger, whose rows are written off the hot path). ARGV[4] = keep_ms. Reply: spent.
local function load_spent()
  local spent = math.max(tonumber(redis.call('HGET', KEYS[1], 'spent')) or 0, tonumber(ARGV[3]))
  redis.call('HSET', KEYS[1], 'spent', string.format('%d', spent))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {spent}
end

-- Give a concurrency slot back. ARGV[3] = lease_id.
local function release()
  return {redis.call('ZREM', KEYS[1], ARGV[3])}
end

local ops = {admit = admit, release = release, settle = settle, acquire = acquire, reserve = reserve,
             settle_budget = settle_budget, load_spent = load_spent}
return ops[op]()
