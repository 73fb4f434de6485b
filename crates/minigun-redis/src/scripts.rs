//! The Lua scripts behind every operation that must be atomic. Each is loaded once per
//! server (EVALSHA, and SCRIPT LOAD on `NOSCRIPT`, which [`redis::Script`] does), and every
//! key it touches is passed in `KEYS`, all in the run's slot.
//!
//! A run exists while its control hash has a `state` field; the scripts that write a run
//! check that first and answer `NORUN` otherwise, so that a call after a server lost the
//! run's keys neither recreates a stream without its group nor succeeds silently. The
//! ownership check is `XPENDING <in> mg <id> <id> 1` and a comparison of the owner (for a
//! commit of several entries, one `XPENDING <in> mg <first> <last> 128 <consumer>` over
//! their range, a page at a time): XCLAIM alone does not check who holds an entry.
//!
//! Payload bytes stay out of Lua wherever atomicity allows: every byte a script receives or
//! builds is copied into and out of the interpreter, which measured at several microseconds
//! per KiB, more than the commands themselves. Work entries are therefore added with plain
//! pipelined `XADD … NOMKSTREAM` (no script: a lost stream answers nil, read as `NORUN`),
//! and a commit passes its results as one argument that goes to `XADD` untouched.

use redis::Script;
use std::sync::OnceLock;

/// Shared by the scripts: the run check and the owner check.
const PRELUDE: &str = r#"
local function run_exists(ctl)
  if redis.call('HEXISTS', ctl, 'state') == 0 then
    return false
  end
  return true
end
-- The entry's delivery count if `consumer` holds it, else false.
local function owned(key, id, consumer)
  local p = redis.call('XPENDING', key, 'mg', id, id, 1)
  if #p > 0 and p[1][2] == consumer then return p[1][4] end
  return false
end
-- Acknowledges and deletes an entry: the stream holds only outstanding entries.
local function remove(key, group, id)
  redis.call('XACK', key, group, id)
  redis.call('XDEL', key, id)
end
local NORUN = 'NORUN the run is unknown to the server'
local function now_ms()
  local t = redis.call('TIME')
  return string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
"#;

/// Declares a script built once, with the prelude before its body.
macro_rules! script {
    ($(#[$doc:meta])* $name:ident, $body:literal) => {
        $(#[$doc])*
        pub(crate) fn $name() -> &'static Script {
            static S: OnceLock<Script> = OnceLock::new();
            S.get_or_init(|| Script::new(&format!("{PRELUDE}{}", $body)))
        }
    };
}

script!(
    /// KEYS in, out, ctl; ARGV consumer, fields… Creates the groups (from id 0) and the
    /// control state `running` with the announcement's fields; returns the cursor of the
    /// run's announcement if one was recorded.
    announce,
    r#"
for _, k in ipairs({{KEYS[1], 'mg'}, {KEYS[2], 'parent'}}) do
  local r = redis.pcall('XGROUP', 'CREATE', k[1], k[2], '0', 'MKSTREAM')
  if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP', 1, true) then
    return redis.error_reply(r.err)
  end
end
redis.call('HSET', KEYS[3], 'state', 'running', unpack(ARGV))
return redis.call('HGET', KEYS[3], 'ann')
"#
);

script!(
    /// KEYS in, out; ARGV consumer, results, ids… (ascending). Commits the entries if the
    /// consumer still holds every one of them: their results (the caller's concatenation)
    /// as one out entry, then one XACK and one XDEL. Returns 1 (held) or 0 (lease lost) per
    /// id; if any is 0, nothing was done (the caller commits the held ones again on their
    /// own). The results go from the arguments to the XADD untouched: a script that cut or
    /// joined them would copy every byte through Lua, which costs more than the rest of the
    /// commit.
    commit,
    r#"
local n = #ARGV - 2
local want, flags, held = {}, {}, 0
for i = 3, #ARGV do
  want[ARGV[i]] = i - 2
  flags[i - 2] = 0
end
local start, hi = ARGV[3], ARGV[#ARGV]
while true do
  local p = redis.call('XPENDING', KEYS[1], 'mg', start, hi, 128, ARGV[1])
  for _, x in ipairs(p) do
    local j = want[x[1]]
    if j and flags[j] == 0 then
      flags[j] = 1
      held = held + 1
    end
  end
  if #p < 128 then break end
  start = '(' .. p[#p][1]
end
if held < n then return flags end
redis.call('XADD', KEYS[2], '*', 'k', 'results', 'c', ARGV[1], 'p', ARGV[2])
redis.call('XACK', KEYS[1], 'mg', unpack(ARGV, 3))
redis.call('XDEL', KEYS[1], unpack(ARGV, 3))
return flags
"#
);

script!(
    /// KEYS in; ARGV consumer, ids…  Resets the idle time of the ids still owned; returns
    /// them.
    heartbeat,
    r#"
local kept = {}
for i = 2, #ARGV do
  if owned(KEYS[1], ARGV[i], ARGV[1]) then
    local r = redis.call('XCLAIM', KEYS[1], 'mg', ARGV[1], 0, ARGV[i], 'JUSTID')
    if #r > 0 then kept[#kept + 1] = ARGV[i] end
  end
end
return kept
"#
);

script!(
    /// KEYS in; ARGV consumer, min idle ms, ids…  Claims the ids still idle (a delivery
    /// each); returns (id, deliveries, fields) per entry taken.
    claim,
    r#"
local got = {}
for i = 3, #ARGV do
  local r = redis.call('XCLAIM', KEYS[1], 'mg', ARGV[1], ARGV[2], ARGV[i])
  local e = r[1]
  if e and e[2] then
    local p = redis.call('XPENDING', KEYS[1], 'mg', e[1], e[1], 1)
    got[#got + 1] = {e[1], p[1][4], e[2]}
  end
end
return got
"#
);

script!(
    /// KEYS in, out, dlq; ARGV id, min idle ms, results, dlq maxlen. Moves an entry still
    /// idle to the dead letters; 1 if it did.
    dead_letter,
    r#"
local p = redis.call('XPENDING', KEYS[1], 'mg', 'IDLE', ARGV[2], ARGV[1], ARGV[1], 1)
if #p == 0 then return 0 end
local owner, count = p[1][2], p[1][4]
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e > 0 then
  local args = {'XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*'}
  for _, f in ipairs(e[1][2]) do args[#args + 1] = f end
  for _, f in ipairs({'d', count, 'o', owner, 'id', ARGV[1]}) do args[#args + 1] = f end
  redis.call(unpack(args))
end
redis.call('XADD', KEYS[2], '*', 'k', 'results', 'c', owner, 'p', ARGV[3])
remove(KEYS[1], 'mg', ARGV[1])
return 1
"#
);

script!(
    /// KEYS in; ARGV consumer, id, (s, n, a, p)…  Replaces an owned entry by its parts; 1
    /// if it did.
    split,
    r#"
if not owned(KEYS[1], ARGV[2], ARGV[1]) then return 0 end
for i = 3, #ARGV, 4 do
  redis.call('XADD', KEYS[1], '*', 's', ARGV[i], 'n', ARGV[i + 1], 'a', ARGV[i + 2],
    'p', ARGV[i + 3])
end
remove(KEYS[1], 'mg', ARGV[2])
return 1
"#
);

script!(
    /// KEYS in; ARGV consumer, claim idle ms, ids…  Makes owned entries idle past their
    /// lease with one delivery less than the server counts, so that the reclaim counts it
    /// back (the server's count, not the caller's: it cannot be stale).
    release,
    r#"
for i = 3, #ARGV do
  local count = owned(KEYS[1], ARGV[i], ARGV[1])
  if count then
    redis.call('XCLAIM', KEYS[1], 'mg', ARGV[1], 0, ARGV[i], 'IDLE', ARGV[2],
      'RETRYCOUNT', math.max(count - 1, 0), 'JUSTID')
  end
end
return 1
"#
);

script!(
    /// KEYS out; ARGV ids…  Acknowledges and deletes out entries the parent has handed on
    /// (a script rather than MULTI: the ACL rules need no `@transaction`).
    ack_out,
    r#"
redis.call('XACK', KEYS[1], 'parent', unpack(ARGV))
redis.call('XDEL', KEYS[1], unpack(ARGV))
return 1
"#
);

script!(
    /// KEYS out, ctl; ARGV consumer, outputs. Publishes `finished` once per consumer (a
    /// `fin:<consumer>` marker set with HSETNX in the control hash).
    finished,
    r#"
if not run_exists(KEYS[2]) then return redis.error_reply(NORUN) end
if redis.call('HSETNX', KEYS[2], 'fin:' .. ARGV[1], '1') == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', 'k', 'finished', 'c', ARGV[1], 'p', ARGV[2])
return 1
"#
);

script!(
    /// KEYS out, ctl; ARGV consumer, payload. Publishes statistics.
    stats,
    r#"
if not run_exists(KEYS[2]) then return redis.error_reply(NORUN) end
redis.call('XADD', KEYS[1], '*', 'k', 'stats', 'c', ARGV[1], 'p', ARGV[2])
return 1
"#
);

script!(
    /// KEYS in; ARGV consumer, count. The entries the consumer holds, without counting a
    /// delivery: (id, deliveries, fields) each; entries deleted meanwhile are left out.
    own,
    r#"
local got = {}
local p = redis.call('XPENDING', KEYS[1], 'mg', '-', '+', ARGV[2], ARGV[1])
for _, x in ipairs(p) do
  local e = redis.call('XRANGE', KEYS[1], x[1], x[1])
  if #e > 0 then got[#got + 1] = {x[1], x[4], e[1][2]} end
end
return got
"#
);

script!(
    /// KEYS in; ARGV min idle ms, count. Pending entries idle that long, oldest first:
    /// (id, owner, idle ms, deliveries, fields or nil if the entry was deleted) each.
    pending_idle,
    r#"
local got = {}
local p = redis.call('XPENDING', KEYS[1], 'mg', 'IDLE', ARGV[1], '-', '+', ARGV[2])
for _, x in ipairs(p) do
  local e = redis.call('XRANGE', KEYS[1], x[1], x[1])
  local fields = false
  if #e > 0 then fields = e[1][2] end
  got[#got + 1] = {x[1], x[2], x[3], x[4], fields}
end
return got
"#
);

script!(
    /// KEYS ctl; ARGV state. Sets the control state of an existing run.
    set_control,
    r#"
if not run_exists(KEYS[1]) then return redis.error_reply(NORUN) end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return 1
"#
);

script!(
    /// KEYS ctl, workers; ARGV consumer, pid, concurrency, host. Records a worker with the
    /// server's time in ms.
    register,
    r#"
if not run_exists(KEYS[1]) then return redis.error_reply(NORUN) end
redis.call('HSET', KEYS[2], ARGV[1], now_ms() .. ' ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
return 1
"#
);

script!(
    /// KEYS ctl, workers. The server's time in ms and the worker table.
    workers,
    r#"
if not run_exists(KEYS[1]) then return redis.error_reply(NORUN) end
return {now_ms(), redis.call('HGETALL', KEYS[2])}
"#
);

script!(
    /// KEYS in, ctl. The `s` and `n` of every work entry, in order (payloads stay on the
    /// server).
    outstanding,
    r#"
if not run_exists(KEYS[2]) then return redis.error_reply(NORUN) end
local got = {}
local from = '-'
while true do
  local page = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 1000)
  for _, e in ipairs(page) do
    local s, n = '0', '0'
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 's' then s = f[i + 1] elseif f[i] == 'n' then n = f[i + 1] end
    end
    got[#got + 1] = s
    got[#got + 1] = n
  end
  if #page < 1000 then break end
  from = '(' .. page[#page][1]
end
return got
"#
);

script!(
    /// KEYS in. Entries in the work stream, and pending entries.
    depth,
    r#"
local p = redis.call('XPENDING', KEYS[1], 'mg')
return {redis.call('XLEN', KEYS[1]), p[1]}
"#
);
