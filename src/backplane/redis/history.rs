//! Per-channel history in Redis: the two Lua scripts, the key names, and the commands
//! that call them. Sans-IO: builds commands and parses replies.
//!
//! For Redis channel `C` (prefix included), all keys share the hash tag `{C}`, so a
//! Redis Cluster keeps a channel's keys (and its shard channel `C`) in one slot:
//!
//! | key      | type   | holds                                                          |
//! |----------|--------|----------------------------------------------------------------|
//! | `{C}:m`  | hash   | `e` the epoch, `s` the top offset, `x` the last TTL refresh    |
//! |          |        | (Redis `TIME`, s), `p:<inst>` = `<seq>:<time>` per instance,   |
//! |          |        | `g` / `n` the replication id / cluster node id that wrote it,  |
//! |          |        | after a fork `pe`, `pf`, `b` (epoch and offset it forked from, |
//! |          |        | first offset of this epoch)                                    |
//! | `{C}:s`  | stream | entry id `<offset>-0`, field `d` = the payload                 |
//!
//! **Forks.** A Redis that takes over without the old one's tail (a promoted replica,
//! a restart that lost writes) would give the tail's offsets to new messages. A publish
//! whose Redis (its `master_replid`) is not the one that wrote the meta hash (`g`)
//! starts a new epoch that continues the offsets from the top it has, and records where
//! it forked; the read script lets a reader of the old epoch go on from there (so new
//! messages are not taken for duplicates). In a cluster, keys that arrived on a node
//! that never replicated their writer (`n` differs and `master_replid2` is not `g`)
//! came by `MIGRATE`, whole: no fork.
//!
//! Both are kept at least `--history-ttl` seconds after the last publish *by any
//! instance*, and at most one and a half times that: a publish refreshes both TTLs (to
//! 1.5 × ttl) only when the last refresh (`x`, by Redis's clock) is half a TTL old, so
//! a busy channel pays for two `EXPIRE`s once per half TTL, not per call. The stream
//! keeps at least `--history-size` entries and at most one stream node (100 entries by
//! default) plus `TRIM_EVERY` more: `XTRIM MAXLEN ~` trims whole nodes, and runs when
//! the top crosses a multiple of `TRIM_EVERY`, not per append.
//!
//! The publish script is one atomic step: drop a re-sent publish already applied
//! (`p:<inst>` = the last sequence number this instance got applied, so a publish sent
//! again after a lost reply is not stored and delivered twice; it lives in the meta
//! hash, so it lasts as long as the channel's history, whoever keeps that alive), append,
//! trim and refresh the TTLs when due, and PUBLISH the payload with its position in front
//! (`envelope::split_position`). Everything in the keys is input that may be wrong (a
//! neighbour app, an operator, a tamperer), so the script checks it first:
//! * a dedupe value beyond anything this instance ever sent is corrupt: ignored,
//!   overwritten and reported (bit 1 of the reply's flags), never "already applied";
//! * a meta hash whose epoch or top is not what wsfan writes starts a new epoch
//!   (bit 2): the history began again, and readers count it as a reset;
//! * a stream whose last entry is at or past the top (offsets reused) moves the top past
//!   it (bit 2) when the batch's first `XADD` finds it, so `XADD` never fails half-way
//!   through a batch (and the normal path pays nothing for the check).
//!
//! Dedupe fields of instances silent for longer than twice the TTL (plus a minute for
//! clocks that disagree) are pruned when the hash holds more than `DEDUPE_FIELDS`. Writes come after every read, so a refusal
//! (`READONLY`, `OOM`, `WRONGTYPE`) happens before anything is written.
//!
//! The read script returns the epoch, the top offset, how far it looked and the entries
//! from an offset — or from the start when the epoch is not the one the caller knows.
//! It costs Redis in proportion to what it returns: `XRANGE … COUNT k` in a loop, `k`
//! sized from the bytes left and the entries seen so far, never materialising much
//! beyond its byte budget. Entries larger than the caller's limit are skipped and
//! looked past (the reply's `next` says how far), so a read always progresses. A
//! corrupt meta hash is refused (`-BADMETA`) for that channel only. That is also what a
//! reconnecting client will ask for ("everything after offset N of epoch E").

use super::positions::{Range, ReadReq, Stream};
use crate::message::Epoch;
use bytes::Bytes;
use redis::Value;

/// KEYS: meta and stream of each channel of the call, in pairs. ARGV: size, ttl,
/// instance, the highest sequence number this instance ever gave out, the
/// `--history-key` pads `ikey` and `okey` (empty: no key; see `envelope`), the
/// replication id of the Redis the call goes to (`node`; empty: unknown, no fork
/// detection), its previous one (`master_replid2`: a promoted replica's old primary),
/// its cluster node id (empty outside a cluster), then for each channel: its name, n, and n pairs of sequence number and
/// payload (that channel's publishes, in order).
///
/// One call carries the publishes of several channels (`Outbox::send_next`): the Lua
/// call, the round trip and one `TIME` are paid once for all of them. Per channel:
/// `HMGET` and `HSET` of the meta hash; per message: `XADD` and `PUBLISH`; amortised:
/// `XTRIM` once per `TRIM_EVERY` offsets, two `EXPIRE`s once per half TTL (module doc).
/// Returns, per channel, `{top, flags}` (top 0: all were re-sends already applied;
/// flags: 1 = corrupt dedupe value, 2 = corrupt meta, history began again, 4 = forked
/// on another Redis, see the module doc) or
/// `{-1, error}` when Redis refused that channel for good (a key of the wrong type):
/// the other channels go on. A refusal that is a link condition (`READONLY`, `OOM`, …)
/// refuses the whole call (it comes at the first write, before anything is written).
pub const PUBLISH_SCRIPT: &str = r#"
local size, ttl, field = ARGV[1], tonumber(ARGV[2]), 'p:' .. ARGV[3]
local maxseq, ikey, okey, node = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local node2, myid = ARGV[8], ARGV[9]
local half = math.floor(ttl / 2)
local expiry = ttl + half
local now = tonumber(redis.call('TIME')[1])
local function refused(err)
  local code = string.match(err, '^(%u+)') or ''
  if code == 'READONLY' or code == 'OOM' or code == 'LOADING' or code == 'BUSY'
     or code == 'MASTERDOWN' or code == 'NOREPLICAS' or code == 'CLUSTERDOWN'
     or code == 'TRYAGAIN' or code == 'MOVED' or code == 'ASK' then
    return redis.error_reply(err)
  end
  return {-1, err}
end
local function group(meta, stream, channel, n, base)
  local m = redis.pcall('HMGET', meta, 'e', 's', field, 'x', 'g', 'n')
  if m.err then return refused(m.err) end
  local flags = 0
  local seen = 0
  if m[3] then
    seen = tonumber(string.match(m[3], '^(%d+):'))
    if not seen or seen > maxseq then seen = 0; flags = 1 end
  end
  -- A channel's sequence numbers rise through the call: none is new if the last is not.
  if tonumber(ARGV[base + 2 * n - 2]) <= seen then return {0, flags} end
  local epoch, top = m[1], tonumber(m[2] or '0')
  local x = tonumber(m[4] or '')
  local renew = node ~= '' and (m[5] ~= node or (myid ~= '' and m[6] ~= myid))
  -- In a cluster, keys that came from another node which this one never replicated
  -- (not its old primary) were moved whole by MIGRATE: no tail can be missing.
  local migrated = myid ~= '' and m[6] and m[6] ~= myid and m[5] ~= node2
  local fork = nil
  if not epoch or #epoch > 32 or not string.match(epoch, '^[0-9a-z]+$')
     or not top or top < 0 or top ~= math.floor(top) or top > MAX_OFFSET - n then
    if epoch or m[2] then flags = flags + 2 end
    local t = redis.call('TIME')
    epoch = string.format('%08x%05x', tonumber(t[1]), tonumber(t[2]))
    local d = redis.pcall('DEL', meta, stream)
    if type(d) == 'table' and d.err then return refused(d.err) end
    top = 0
    renew = true
  elseif node ~= '' and m[5] and m[5] ~= node and not migrated then
    -- Another Redis wrote this history last (a promoted replica, or a restart): it may
    -- lack the old one's tail, whose offsets must not be given out again as if they
    -- were the same messages. A new epoch forks off at the top: readers that were in
    -- the old one go on from here (the read script says where it forked).
    fork = {epoch, top}
    local t = redis.call('TIME')
    epoch = string.format('%08x%05x', tonumber(t[1]), tonumber(t[2]))
    flags = bit.bor(flags, 4)
    renew = true
  end
  local off = top
  local last
  local first = true
  for i = 1, n do
    local seq = ARGV[base + 2 * i - 2]
    if tonumber(seq) > seen then
      off = off + 1
      local id = string.format('%d', off)
      local body = ARGV[base + 2 * i - 1]
      if first then
        first = false
        -- NOMKSTREAM: a stream that is gone while its meta hash is not gets its TTL
        -- below, whatever the meta hash says about the last refresh.
        local r = redis.pcall('XADD', stream, 'NOMKSTREAM', id .. '-0', 'd', body)
        if type(r) == 'table' and r.err then
          if not string.find(r.err, 'equal or smaller', 1, true) then
            return refused(r.err)
          end
          -- The stream is ahead of the top (offsets reused): move past its last entry.
          local tail = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
          off = tonumber(string.match(tail[1][1], '^(%d+)')) + 1
          id = string.format('%d', off)
          flags = bit.bor(flags, 2)
          redis.call('XADD', stream, id .. '-0', 'd', body)
        elseif not r then
          renew = true
          redis.call('XADD', stream, id .. '-0', 'd', body)
        end
      else
        redis.call('XADD', stream, id .. '-0', 'd', body)
      end
      local head = id .. ':' .. epoch .. ':'
      if ikey == '' then
        redis.call('PUBLISH', channel, '\0h' .. head .. body)
      else
        local tag = redis.sha1hex(okey .. redis.sha1hex(ikey .. head .. body))
        redis.call('PUBLISH', channel, '\0H' .. tag .. head .. body)
      end
      last = seq
    end
  end
  if math.floor(top / TRIM_EVERY) ~= math.floor(off / TRIM_EVERY) or renew then
    redis.call('XTRIM', stream, 'MAXLEN', '~', size)
  end
  if not m[3] and redis.call('HLEN', meta) > DEDUPE_FIELDS then
    local all = redis.call('HGETALL', meta)
    for i = 1, #all, 2 do
      local at = string.match(all[i + 1], ':(%d+)$')
      if string.sub(all[i], 1, 2) == 'p:' and (not at or tonumber(at) + 2 * ttl + 60 < now) then
        redis.call('HDEL', meta, all[i])
      end
    end
  end
  local top_s = string.format('%d', off)
  if renew or not x or x > now or now - x >= half then
    redis.call('HSET', meta, 'e', epoch, 's', top_s, field, last .. ':' .. now, 'x', now)
    if node ~= '' then redis.call('HSET', meta, 'g', node) end
    if myid ~= '' then redis.call('HSET', meta, 'n', myid) end
    if fork then
      redis.call('HSET', meta, 'pe', fork[1], 'pf', string.format('%d', fork[2]),
        'b', string.format('%d', fork[2] + 1))
    end
    redis.call('EXPIRE', meta, expiry)
    redis.call('EXPIRE', stream, expiry)
  else
    redis.call('HSET', meta, 's', top_s, field, last .. ':' .. now)
  end
  return {off, flags}
end
local out = {}
local a = 10
for g = 1, #KEYS / 2 do
  local n = tonumber(ARGV[a + 1])
  local r = group(KEYS[2 * g - 1], KEYS[2 * g], ARGV[a], n, a + 2)
  if r.err then return r end
  out[g] = r
  a = a + 2 + 2 * n
end
return out
"#;

/// Dedupe fields a meta hash holds before those of silent instances are pruned.
pub const DEDUPE_FIELDS: usize = 64;

/// KEYS: meta, stream. ARGV: epoch known, first offset, max entries, max bytes, max
/// entry bytes, `1` to begin a history (epoch, top 0) when the channel has none (a
/// client is about to be told its position), the TTL for it. Returns `{epoch or nil,
/// top, next, fork, offset, payload, …}`: no entries for first offset 0 (a position
/// read), else from the first offset if the epoch matches; if the caller's epoch is the
/// one this history forked from (`pe`), from the fork (`pf` + 1) at the latest, and
/// `fork` is `pf` (else -1); else from the start of this epoch (`b`, or 1); at least
/// one entry if any, then as many as fit in max bytes.
/// Entries larger than max entry bytes (not written by wsfan, or by an instance with a
/// larger `--max-message-size`) are looked past, not returned. `next`: the first offset
/// not looked at (`top + 1` when the read reached the end).
pub const READ_SCRIPT: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'e', 's', 'pe', 'pf', 'b')
local epoch, top = m[1], tonumber(m[2] or '0')
if not epoch then
  if ARGV[6] ~= '1' then return {false, 0, 0, -1} end
  -- A client is told a position now: the history it is in begins here (the publish
  -- script takes this epoch up).
  local t = redis.call('TIME')
  epoch = string.format('%08x%05x', tonumber(t[1]), tonumber(t[2]))
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  return {epoch, 0, 1, -1}
end
if #epoch > 32 or not string.match(epoch, '^[0-9a-z]+$') or not top or top < 0
   or top ~= math.floor(top) or top > MAX_OFFSET then
  return redis.error_reply('BADMETA the history meta hash of this channel is corrupt')
end
local from = tonumber(ARGV[2])
if from == 0 then return {epoch, top, top + 1, -1} end
local fork = -1
if epoch ~= ARGV[1] then
  local pf, b = tonumber(m[4] or ''), tonumber(m[5] or '')
  if m[3] == ARGV[1] and pf and pf >= 0 and pf <= top and pf == math.floor(pf) then
    -- The caller's epoch is the one this history forked from at pf: what it had up
    -- to there is this history's too.
    fork = pf
    from = math.min(from, pf + 1)
  elseif b and b >= 1 and b <= top + 1 and b == math.floor(b) then
    from = b
  else
    from = 1
  end
end
local maxn, budget, maxentry = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {epoch, top, top + 1, fork}
local kept, bytes, looked, scanned = 0, 0, 0, 0
local cursor = from .. '-0'
local count = 1
local last = from - 1
while true do
  local r = redis.call('XRANGE', KEYS[2], cursor, '+', 'COUNT', count)
  if #r == 0 then return out end
  for _, e in ipairs(r) do
    local off = tonumber(string.match(e[1], '^(%d+)'))
    local data = e[2][2] or ''
    if kept > 0 and (kept >= maxn or bytes + #data > budget or scanned > 4 * budget) then
      out[3] = off
      return out
    end
    looked = looked + 1
    scanned = scanned + #data
    if #data <= maxentry then
      kept = kept + 1
      bytes = bytes + #data
      out[#out + 1] = off
      out[#out + 1] = data
    elseif scanned > 4 * budget then
      out[3] = off + 1
      return out
    end
    cursor = '(' .. e[1]
    last = off
  end
  -- What is left of the budget would not hold an entry of the size seen so far: stop
  -- here rather than fetch one only to leave it out (`next` is the one after the last).
  local avg = scanned / looked
  if kept > 0 and (budget - bytes < avg or kept >= maxn) then
    out[3] = last + 1
    return out
  end
  count = math.max(1, math.min(64, math.floor((budget - bytes) / (avg + 1))))
end
"#;
/// Entries one read asks for at most.
pub const READ_COUNT: usize = 1000;
/// Payload bytes one read returns at most (beyond its first entry): the reply must fit
/// the publish link's read buffer (`max_bulk` + 128 KiB) with room for RESP framing.
pub const READ_BYTES: usize = 64 * 1024;

/// The largest offset: Lua prints larger numbers in exponent form (`%.14g`), which no
/// stream id or envelope may carry. A top beyond it is corrupt (`BADMETA` for a read);
/// a publish that would pass it starts a new epoch (counted as a reset, as a corrupt
/// meta hash is). At a million publishes a second on one channel it lasts three years.
pub const MAX_OFFSET: u64 = 99_999_999_999_999;

/// The publish script trims a stream (`XTRIM MAXLEN ~`) when its top crosses a multiple
/// of this, not on every append: a stream holds at most `--history-size` + one stream
/// node (100 entries) + this many entries.
pub const TRIM_EVERY: u64 = 50;

fn fill(script: &str) -> String {
    script
        .replace("DEDUPE_FIELDS", &DEDUPE_FIELDS.to_string())
        .replace("MAX_OFFSET", &MAX_OFFSET.to_string())
        .replace("TRIM_EVERY", &TRIM_EVERY.to_string())
}

/// The publish script with its constants filled in.
pub fn publish_script() -> String {
    fill(PUBLISH_SCRIPT)
}

/// The read script with its constants filled in.
pub fn read_script() -> String {
    fill(READ_SCRIPT)
}

/// What the publish side needs to call the scripts.
#[derive(Debug, Clone)]
pub struct History {
    /// `--history-size`: entries kept per channel.
    pub size: usize,
    /// `--history-ttl` in seconds.
    pub ttl: u64,
    /// This process's id in dedupe keys (random per start).
    pub instance: String,
    /// The largest stream entry a read returns (`--max-message-size` + envelope).
    pub max_entry: usize,
    /// `--history-key`: positioned envelopes carry a tag only its holders can make.
    pub key: Option<crate::envelope::HistoryKey>,
    /// The replication id (`INFO replication`'s `master_replid`) of the Redis the
    /// publish link is on, asked each time it comes up; empty: unknown (no fork
    /// detection).
    pub node: String,
    /// That Redis's `master_replid2` (the primary it replicated before a promotion).
    pub node2: String,
    /// That Redis's `CLUSTER MYID` (empty outside a cluster): keys that arrive from
    /// another node it never replicated came by `MIGRATE`, whole: no fork.
    pub myid: String,
}

/// The SHAs `SCRIPT LOAD` returned, once both are loaded.
#[derive(Debug, Clone, Default)]
pub struct Shas {
    pub publish: Option<String>,
    pub read: Option<String>,
}

impl Shas {
    pub fn loaded(&self) -> bool {
        self.publish.is_some() && self.read.is_some()
    }
}

fn meta(ch: &str) -> String {
    format!("{{{ch}}}:m")
}

fn stream(ch: &str) -> String {
    format!("{{{ch}}}:s")
}

/// The meta hash and stream keys of a Redis channel (for tests and tools).
pub fn keys(redis_channel: &str) -> (String, String) {
    (meta(redis_channel), stream(redis_channel))
}

impl History {
    /// One script call publishing `items` (sequence number, payload) on `ch`, in order;
    /// `max_seq`: the highest sequence number this instance ever gave out.
    pub fn publish(&self, sha: &str, ch: &str, max_seq: u64, items: &[(u64, &[u8])]) -> redis::Cmd {
        self.publish_channels(sha, max_seq, &[(ch, items.to_vec())])
    }

    /// One script call publishing the publishes of several channels (each channel's in
    /// order): `groups` of (Redis channel, its (sequence number, payload) pairs).
    pub fn publish_channels(
        &self,
        sha: &str,
        max_seq: u64,
        groups: &[ChannelGroup<'_>],
    ) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        c.arg(sha).arg(groups.len() * 2);
        for (ch, _) in groups {
            c.arg(meta(ch)).arg(stream(ch));
        }
        c.arg(self.size)
            .arg(self.ttl)
            .arg(&self.instance)
            .arg(max_seq);
        match &self.key {
            Some(k) => c.arg(&k.ikey[..]).arg(&k.okey[..]),
            None => c.arg("").arg(""),
        };
        c.arg(&self.node).arg(&self.node2).arg(&self.myid);
        for (ch, items) in groups {
            c.arg(*ch).arg(items.len());
            for (seq, body) in items {
                c.arg(*seq).arg(*body);
            }
        }
        c
    }

    pub fn read(&self, sha: &str, redis_channel: &str, req: &ReadReq) -> redis::Cmd {
        let (epoch, from) = req.script_args();
        self.read_from(sha, redis_channel, epoch, from, false)
    }

    /// The read script from `from` of `epoch` (`from` 0: the top only); `begin`: a
    /// channel without history gets one (epoch, top 0), so a client can be told a
    /// position to recover from later.
    pub fn read_from(
        &self,
        sha: &str,
        redis_channel: &str,
        epoch: &[u8],
        from: u64,
        begin: bool,
    ) -> redis::Cmd {
        redis::cmd("EVALSHA")
            .arg(sha)
            .arg(2)
            .arg(meta(redis_channel))
            .arg(stream(redis_channel))
            .arg(epoch)
            .arg(from)
            .arg(READ_COUNT)
            .arg(READ_BYTES)
            .arg(self.max_entry)
            .arg(if begin { "1" } else { "0" })
            .arg(self.ttl)
            .clone()
    }
}

/// One channel's publishes in a script call: the Redis channel and its (sequence
/// number, payload) pairs, in order.
pub type ChannelGroup<'a> = (&'a str, Vec<(u64, &'a [u8])>);

/// What the publish script answered for one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelResult {
    /// Applied (or all re-sends already applied): the flags (see `PUBLISH_SCRIPT`).
    Published { flags: u8 },
    /// Refused for good for this channel: Redis's error text.
    Refused(String),
}

/// Parses the publish script's reply: one result per channel of the call.
/// The `master_replid` in an `INFO replication` reply: 40 hex digits (Redis gives a
/// new one on every start and on a replica's promotion). `None` if absent or odd.
pub fn replication_id(v: &Value) -> Option<String> {
    info_field(v, "master_replid")
}

/// The `master_replid2` in an `INFO replication` reply (all zeros when the node was
/// never promoted).
pub fn previous_replication_id(v: &Value) -> Option<String> {
    info_field(v, "master_replid2")
}

fn info_field(v: &Value, name: &str) -> Option<String> {
    let text = match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?,
        Value::VerbatimString { text, .. } => text.as_str(),
        _ => return None,
    };
    let id = text.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
    })?;
    (id.len() == 40 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

pub fn parse_published(v: &Value) -> Option<Vec<ChannelResult>> {
    let Value::Array(groups) = v else {
        return None;
    };
    groups
        .iter()
        .map(|g| match g {
            Value::Array(a) => match a.as_slice() {
                [Value::Int(top), Value::Int(flags)] if *top >= 0 && (0..8).contains(flags) => {
                    Some(ChannelResult::Published {
                        flags: *flags as u8,
                    })
                }
                [Value::Int(-1), Value::BulkString(e)] => Some(ChannelResult::Refused(
                    String::from_utf8_lossy(e).into_owned(),
                )),
                [Value::Int(-1), Value::SimpleString(e)] => Some(ChannelResult::Refused(e.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Parses the read script's reply. Anything but what the script returns is an error
/// (for this read only: the link goes on).
pub fn parse_range(v: Value) -> Result<Range, String> {
    let Value::Array(items) = v else {
        return Err(format!("unexpected history read reply {v:?}"));
    };
    let mut it = items.into_iter();
    let epoch = match it.next() {
        Some(Value::Nil) => None,
        Some(Value::BulkString(e)) => match Epoch::new(Bytes::from(e)) {
            Some(e) => Some(e),
            None => return Err("history read: not an epoch".to_string()),
        },
        other => return Err(format!("unexpected epoch {other:?}")),
    };
    let mut int = |what: &str| match it.next() {
        Some(Value::Int(t)) if t >= 0 => Ok(t as u64),
        other => Err(format!("unexpected {what} {other:?}")),
    };
    let top = int("top offset")?;
    let next = int("next offset")?;
    let fork = match it.next() {
        Some(Value::Int(-1)) => None,
        Some(Value::Int(f)) if f >= 0 && f as u64 <= top => Some(f as u64),
        other => return Err(format!("unexpected fork offset {other:?}")),
    };
    let Some(epoch) = epoch else {
        return Ok(Range::None);
    };
    let mut entries: Vec<(u64, Bytes)> = Vec::new();
    while let Some(off) = it.next() {
        match (off, it.next()) {
            (Value::Int(o), Some(Value::BulkString(d)))
                if o > 0 && entries.last().is_none_or(|(p, _)| (o as u64) > *p) =>
            {
                entries.push((o as u64, Bytes::from(d)))
            }
            (o, d) => return Err(format!("unexpected history entry {o:?} {d:?}")),
        }
    }
    Ok(Range::At(Stream {
        epoch,
        top,
        next,
        fork,
        entries,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn read_replies_parse_and_garbage_is_an_error() {
        let r = parse_range(Value::Array(vec![
            bulk("ep"),
            Value::Int(9),
            Value::Int(10),
            Value::Int(-1),
            Value::Int(8),
            bulk("a"),
            Value::Int(9),
            bulk("b"),
        ]))
        .expect("parses");
        let Range::At(r) = r else { panic!("{r:?}") };
        assert_eq!(r.epoch, Epoch::from_static("ep"));
        assert_eq!((r.top, r.next), (9, 10));
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[1], (9, Bytes::from_static(b"b")));
        assert_eq!(r.fork, None);
        let forked = parse_range(Value::Array(vec![
            bulk("ep"),
            Value::Int(9),
            Value::Int(10),
            Value::Int(4),
        ]));
        assert!(matches!(
            forked,
            Ok(Range::At(Stream { fork: Some(4), .. }))
        ));
        let none = parse_range(Value::Array(vec![
            Value::Nil,
            Value::Int(0),
            Value::Int(0),
            Value::Int(-1),
        ]));
        assert_eq!(none, Ok(Range::None));
        for bad in [
            Value::Int(1),
            Value::Array(vec![]),
            Value::Array(vec![bulk("e")]),
            Value::Array(vec![bulk("e"), Value::Int(1)]),
            Value::Array(vec![bulk("e"), Value::Int(-1), Value::Int(0)]),
            Value::Array(vec![bulk("E"), Value::Int(1), Value::Int(2)]),
            Value::Array(vec![bulk("a:b"), Value::Int(1), Value::Int(2)]),
            Value::Array(vec![bulk("e"), Value::Int(1), Value::Int(2)]),
            // A fork past the top.
            Value::Array(vec![bulk("e"), Value::Int(1), Value::Int(2), Value::Int(5)]),
            Value::Array(vec![
                bulk("e"),
                Value::Int(1),
                Value::Int(2),
                Value::Int(-1),
                Value::Int(1),
            ]),
            Value::Array(vec![
                bulk("e"),
                Value::Int(1),
                Value::Int(2),
                Value::Int(-1),
                bulk("x"),
                bulk("y"),
            ]),
            // Entries out of order or repeated.
            Value::Array(vec![
                bulk("e"),
                Value::Int(9),
                Value::Int(10),
                Value::Int(-1),
                Value::Int(9),
                bulk("a"),
                Value::Int(8),
                bulk("b"),
            ]),
        ] {
            assert!(parse_range(bad.clone()).is_err(), "{bad:?}");
        }
        let one = |a: Value, b: Value| Value::Array(vec![Value::Array(vec![a, b])]);
        assert_eq!(
            parse_published(&one(Value::Int(7), Value::Int(1))),
            Some(vec![ChannelResult::Published { flags: 1 }])
        );
        assert_eq!(
            parse_published(&one(Value::Int(-1), bulk("WRONGTYPE x"))),
            Some(vec![ChannelResult::Refused("WRONGTYPE x".into())])
        );
        for bad in [
            Value::Int(7),
            Value::Array(vec![Value::Int(7), Value::Int(1)]),
            one(Value::Int(-1), Value::Int(0)),
            one(Value::Int(3), Value::Int(9)),
        ] {
            assert_eq!(parse_published(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_share_the_channel_hash_tag() {
        let h = History {
            size: 10,
            ttl: 60,
            instance: "i1".into(),
            max_entry: 100,
            key: None,
            node: String::new(),
            node2: String::new(),
            myid: String::new(),
        };
        let c = String::from_utf8(
            h.publish("sha", "p:room", 7, &[(7, b"x")])
                .get_packed_command(),
        )
        .expect("utf8");
        for k in ["{p:room}:m", "{p:room}:s", "i1"] {
            assert!(c.contains(k), "{k} in {c}");
        }
        assert_eq!(keys("c"), ("{c}:m".to_string(), "{c}:s".to_string()));
    }
}
