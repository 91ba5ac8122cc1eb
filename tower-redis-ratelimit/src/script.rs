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
    -- Sliding window counter (1) and fixed window (3): the key is a hash {w = window index, c = count, p = previous}.
    local idx = math.floor(now_ms / window)
    local elapsed = now_ms - idx * window
    local h = redis.call('HMGET', key, 'w', 'c', 'p')
    local w = tonumber(h[1])
    local c = tonumber(h[2]) or 0
    local p = tonumber(h[3]) or 0
    if w == nil then
      c = 0
      p = 0
    elseif w == idx - 1 then
      p = c
      c = 0
    elseif w ~= idx then
      c = 0
      p = 0
    end
    if alg == 3 then p = 0 end
    local estimate = p * (window - elapsed) / window + c
    reset = window - elapsed
    if estimate + cost > limit then
      remaining = math.max(0, math.floor(limit - estimate))
      if alg == 3 then
        wait = window - elapsed
      else
        local budget = limit - c - cost
        if budget >= 0 and p > 0 then
          -- Within this window, once enough of the previous window has slid out.
          wait = math.ceil(window * (1 - budget / p) - elapsed)
        elseif c + cost <= limit then
          wait = window - elapsed
        elseif cost <= limit then
          wait = math.ceil(window - elapsed + window * (1 - (limit - cost) / c))
        else
          wait = window
        end
      end
      if wait < 1 then wait = 1 end
    else
      remaining = math.floor(limit - estimate - cost)
      local ttl = window - elapsed
      if alg == 1 then ttl = ttl + window end
      writes[#writes + 1] = {'hash', key, idx, c + cost, p, ttl}
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
    else
      redis.call('HSET', w[2], 'w', w[3], 'c', w[4], 'p', w[5])
      redis.call('PEXPIRE', w[2], w[6])
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
