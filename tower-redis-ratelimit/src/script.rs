//! The one script that makes every decision: one EVALSHA per request, allowed or denied.
//!
//! KEYS: the block key, then one key per policy, all under the same `{...}` hash tag (one Cluster slot).
//! ARGV: cost, number of policies, then per policy: algorithm code, limit, window in ms, burst.
//!
//! The script reads Redis's own clock (`TIME`), so every process agrees on the time. It first checks every policy,
//! and only if all admit the request does it write them (all or nothing); a denial writes nothing. Every key it
//! writes gets a TTL in the same call. Reply: `[allowed, retry_after_ms, now_us, blocked, remaining_1, reset_ms_1,
//! ...]`.

use std::sync::LazyLock;

use redis::Script;

pub(crate) static DECIDE: LazyLock<Script> = LazyLock::new(|| Script::new(DECIDE_LUA));

const DECIDE_LUA: &str = r"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local cost = tonumber(ARGV[1])
local n = tonumber(ARGV[2])

local block_ms = redis.call('PTTL', KEYS[1])
if block_ms > 0 then
  local out = {0, block_ms, now_us, 1}
  for i = 1, n do
    out[#out + 1] = 0
    out[#out + 1] = block_ms
  end
  return out
end

local allowed = 1
local retry_after = 0
local out = {0, 0, now_us, 0}
local writes = {}

for i = 1, n do
  local base = 2 + (i - 1) * 4
  local alg = tonumber(ARGV[base + 1])
  local limit = tonumber(ARGV[base + 2])
  local window = tonumber(ARGV[base + 3])
  local burst = tonumber(ARGV[base + 4])
  local key = KEYS[i + 1]
  local remaining, reset, wait

  if alg == 2 then
    -- GCRA: the key holds the theoretical arrival time (TAT) in microseconds.
    local interval = window * 1000 / (limit - burst + 1)
    local tat = tonumber(redis.call('GET', key) or '') or now_us
    if tat < now_us then tat = now_us end
    local new_tat = tat + cost * interval
    local allow_at = new_tat - burst * interval
    local diff = now_us - allow_at
    if diff < 0 then
      wait = math.ceil(-diff / 1000)
      remaining = math.max(0, math.floor((now_us - (tat - burst * interval)) / interval))
      reset = math.ceil((tat - now_us) / 1000)
    else
      remaining = math.floor(diff / interval)
      reset = math.ceil((new_tat - now_us) / 1000)
      writes[#writes + 1] = {'gcra', key, string.format('%.3f', new_tat), math.max(1, math.ceil((new_tat - now_us) / 1000))}
    end
  else
    local idx = math.floor(now_ms / window)
    local elapsed = now_ms - idx * window
    reset = window - elapsed
    if alg == 1 then
      -- Sliding window counter over 8 sub-windows. The hash holds w = window index, c0..c7 = this window's counts
      -- per sub-window, p0..p7 = the previous window's. The previous window counts for the sub-windows that still
      -- overlap the sliding window (now - window, now]; the one the sliding window's start falls in is counted in
      -- full, so the estimate never falls below the true count and no window ever admits more than the limit.
      local h = redis.call('HMGET', key, 'w', 'c0', 'c1', 'c2', 'c3', 'c4', 'c5', 'c6', 'c7',
        'p0', 'p1', 'p2', 'p3', 'p4', 'p5', 'p6', 'p7')
      local w = tonumber(h[1])
      local cur = {}
      local prev = {}
      for j = 0, 7 do
        cur[j] = tonumber(h[2 + j]) or 0
        prev[j] = tonumber(h[10 + j]) or 0
      end
      local rolled = w ~= idx
      if w == idx - 1 then
        prev = cur
        cur = {[0] = 0, 0, 0, 0, 0, 0, 0, 0}
      elseif w ~= idx then
        prev = {[0] = 0, 0, 0, 0, 0, 0, 0, 0}
        cur = {[0] = 0, 0, 0, 0, 0, 0, 0, 0}
      end
      local here = math.floor(elapsed * 8 / window)
      local estimate = 0
      for j = 0, 7 do
        estimate = estimate + cur[j]
        if j >= here then estimate = estimate + prev[j] end
      end
      if estimate + cost > limit then
        remaining = math.max(0, limit - estimate)
        -- Room comes back as counted sub-windows slide out: first the previous window's, then this one's.
        local need = estimate + cost - limit
        local freed = 0
        for j = here, 7 do
          if not wait then
            freed = freed + prev[j]
            if freed >= need then wait = math.ceil((j + 1) * window / 8 - elapsed) end
          end
        end
        for j = 0, 7 do
          if not wait then
            freed = freed + cur[j]
            if freed >= need then wait = math.ceil(window - elapsed + (j + 1) * window / 8) end
          end
        end
        if not wait then wait = window end
        if wait < 1 then wait = 1 end
      else
        remaining = limit - estimate - cost
        writes[#writes + 1] = {'sliding', key, idx, here, cost, rolled, cur, prev, window - elapsed + window}
      end
    else
      -- Fixed window: the hash holds w = window index and c = count.
      local h = redis.call('HMGET', key, 'w', 'c')
      local c = 0
      if tonumber(h[1]) == idx then c = tonumber(h[2]) or 0 end
      if c + cost > limit then
        remaining = math.max(0, limit - c)
        wait = window - elapsed
        if wait < 1 then wait = 1 end
      else
        remaining = limit - c - cost
        writes[#writes + 1] = {'fixed', key, idx, c + cost, window - elapsed}
      end
    end
  end

  if wait then
    allowed = 0
    if wait > retry_after then retry_after = wait end
  end
  out[#out + 1] = remaining
  out[#out + 1] = reset
end

if allowed == 1 and cost > 0 then
  for _, w in ipairs(writes) do
    if w[1] == 'gcra' then
      redis.call('SET', w[2], w[3], 'PX', w[4])
    elseif w[1] == 'fixed' then
      redis.call('HSET', w[2], 'w', w[3], 'c', w[4])
      redis.call('PEXPIRE', w[2], w[5])
    elseif w[6] then
      -- A new window: rewrite the whole hash (this window's counts move to the previous window's fields).
      local cur = w[7]
      local prev = w[8]
      cur[w[4]] = cur[w[4]] + w[5]
      redis.call('HSET', w[2], 'w', w[3],
        'c0', cur[0], 'c1', cur[1], 'c2', cur[2], 'c3', cur[3], 'c4', cur[4], 'c5', cur[5], 'c6', cur[6], 'c7', cur[7],
        'p0', prev[0], 'p1', prev[1], 'p2', prev[2], 'p3', prev[3], 'p4', prev[4], 'p5', prev[5], 'p6', prev[6],
        'p7', prev[7])
      redis.call('PEXPIRE', w[2], w[9])
    else
      redis.call('HINCRBY', w[2], 'c' .. w[4], w[5])
      redis.call('PEXPIRE', w[2], w[9])
    end
  end
end
out[1] = allowed
out[2] = retry_after
return out
";

/// The decoded reply of the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) allowed: bool,
    pub(crate) retry_after_ms: u64,
    pub(crate) server_time_us: u64,
    pub(crate) blocked: bool,
    /// Per policy: (remaining, reset in ms).
    pub(crate) policies: Vec<(u64, u64)>,
}

impl Reply {
    /// Decodes the script's reply; `None` if it has an unexpected shape (it is then treated as a Redis failure).
    pub(crate) fn decode(values: &[i64], policies: usize) -> Option<Self> {
        if values.len() != 4 + 2 * policies {
            return None;
        }
        let non_negative = |value: i64| u64::try_from(value.max(0)).unwrap_or(0);
        Some(Self {
            allowed: values[0] == 1,
            retry_after_ms: non_negative(values[1]),
            server_time_us: non_negative(values[2]),
            blocked: values[3] == 1,
            policies: values[4..]
                .chunks_exact(2)
                .map(|pair| (non_negative(pair[0]), non_negative(pair[1])))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_of_the_wrong_length_is_refused() {
        assert_eq!(Reply::decode(&[1, 0, 5, 0], 1), None);
        let reply = Reply::decode(&[0, 250, 5, 0, 0, 900], 1).unwrap();
        assert!(!reply.allowed);
        assert_eq!(reply.retry_after_ms, 250);
        assert_eq!(reply.policies, vec![(0, 900)]);
    }
}
