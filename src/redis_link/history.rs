//! Per-channel history in Redis: the two Lua scripts, the key names, and the commands
//! that call them. Sans-IO: builds commands and parses replies.
//!
//! For Redis channel `C` (prefix included), all keys share the hash tag `{C}`, so a
//! later Redis Cluster keeps a channel's keys (and its shard channel) in one slot:
//!
//! | key            | type   | holds                                                |
//! |----------------|--------|------------------------------------------------------|
//! | `{C}:m`        | hash   | `e` the epoch, `s` the top offset                    |
//! | `{C}:s`        | stream | entry id `<offset>-0`, field `d` = the payload       |
//! | `{C}:p:<inst>` | string | the last publish sequence number of one instance     |
//!
//! All three expire after `--history-ttl` seconds without a publish. The stream keeps
//! at least `--history-size` entries and at most one stream node (100 entries by
//! default) more: `MAXLEN ~` trims whole nodes, which costs Redis 19 µs per publish
//! where an exact trim costs 27 µs (`INFO commandstats`, 10,000-entry streams). A
//! vanished meta hash starts a new epoch (and clears a stream left behind).
//!
//! The publish script is one atomic step: drop a re-sent publish already applied
//! (instance id + sequence number, so a publish sent again after a lost reply is not
//! stored and delivered twice), append, trim, refresh the TTL and PUBLISH the payload
//! with its position in front (`envelope::split_position`).
//!
//! The read script returns the epoch, the top offset and the entries from an offset,
//! bounded by count and bytes — or from the start when the epoch is not the one the
//! caller knows. That is also what a reconnecting client will ask for ("everything
//! after offset N of epoch E").

use super::positions::{Range, ReadReq};
use bytes::Bytes;
use redis::Value;

/// KEYS: meta, stream, dedupe. ARGV: channel, size, ttl, n, then n pairs of sequence
/// number and payload (one channel's publishes, in order). Publishes whose sequence
/// number the dedupe key has already seen (a re-send) are skipped; the rest get the next
/// offsets, are appended and PUBLISHed. Returns the top offset, or 0 when all were
/// re-sends already applied.
pub const PUBLISH_SCRIPT: &str = r#"
local seen = tonumber(redis.call('GET', KEYS[3]) or '0')
local n = tonumber(ARGV[4])
local fresh = 0
for i = 1, n do
  if tonumber(ARGV[3 + 2 * i]) > seen then fresh = fresh + 1 end
end
if fresh == 0 then return 0 end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  local t = redis.call('TIME')
  epoch = string.format('%08x%05x', tonumber(t[1]), tonumber(t[2]))
  redis.call('HSET', KEYS[1], 'e', epoch)
  redis.call('DEL', KEYS[2])
end
local top = redis.call('HINCRBY', KEYS[1], 's', fresh)
local off = top - fresh
local last = seen
for i = 1, n do
  local seq = tonumber(ARGV[3 + 2 * i])
  if seq > seen then
    off = off + 1
    local body = ARGV[4 + 2 * i]
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], off .. '-0', 'd', body)
    redis.call('PUBLISH', ARGV[1], '\0h' .. off .. ':' .. epoch .. ':' .. body)
    last = seq
  end
end
redis.call('SET', KEYS[3], last, 'EX', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return top
"#;

/// KEYS: meta, stream. ARGV: epoch known, first offset, max entries, max bytes, max
/// entry bytes. Returns `{epoch or nil, top, offset, payload, offset, payload, …}`:
/// no entries for first offset 0 (a position read), else from the first offset if the
/// epoch matches, else from the start; at least one entry
/// if any, then as many as fit in max bytes. An entry larger than max entry bytes (not
/// written by wsfan) is left out.
pub const READ_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then return {false, 0} end
local top = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
if ARGV[2] == '0' then return {epoch, top} end
local from = ARGV[2] .. '-0'
if epoch ~= ARGV[1] then from = '-' end
local r = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', ARGV[3])
local out = {epoch, top}
local bytes = 0
for i, e in ipairs(r) do
  local data = e[2][2] or ''
  if #data <= tonumber(ARGV[5]) then
    if i > 1 and bytes + #data > tonumber(ARGV[4]) then break end
    bytes = bytes + #data
    out[#out + 1] = tonumber(string.match(e[1], '^(%d+)'))
    out[#out + 1] = data
  end
end
return out
"#;

/// Entries one read asks for at most.
pub const READ_COUNT: usize = 1000;
/// Payload bytes one read returns at most (beyond its first entry): the reply must fit
/// the publish link's read buffer (`max_bulk` + 128 KiB) with room for RESP framing.
pub const READ_BYTES: usize = 64 * 1024;

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
    /// One script call publishing `items` (sequence number, payload) on `ch`, in order.
    pub fn publish(&self, sha: &str, ch: &str, items: &[(u64, &[u8])]) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        c.arg(sha)
            .arg(3)
            .arg(meta(ch))
            .arg(stream(ch))
            .arg(format!("{{{ch}}}:p:{}", self.instance))
            .arg(ch)
            .arg(self.size)
            .arg(self.ttl)
            .arg(items.len());
        for (seq, body) in items {
            c.arg(*seq).arg(*body);
        }
        c
    }

    pub fn read(&self, sha: &str, redis_channel: &str, req: &ReadReq) -> redis::Cmd {
        redis::cmd("EVALSHA")
            .arg(sha)
            .arg(2)
            .arg(meta(redis_channel))
            .arg(stream(redis_channel))
            .arg(&req.epoch[..])
            .arg(req.from)
            .arg(READ_COUNT)
            .arg(READ_BYTES)
            .arg(self.max_entry)
            .clone()
    }
}

/// Parses the read script's reply.
pub fn parse_range(v: Value) -> Result<Range, String> {
    let Value::Array(items) = v else {
        return Err(format!("unexpected history read reply {v:?}"));
    };
    let mut it = items.into_iter();
    let epoch = match it.next() {
        Some(Value::Nil) => None,
        Some(Value::BulkString(e)) => Some(Bytes::from(e)),
        other => return Err(format!("unexpected epoch {other:?}")),
    };
    let top = match it.next() {
        Some(Value::Int(t)) if t >= 0 => t as u64,
        other => return Err(format!("unexpected top offset {other:?}")),
    };
    let mut entries = Vec::new();
    while let Some(off) = it.next() {
        match (off, it.next()) {
            (Value::Int(o), Some(Value::BulkString(d))) if o > 0 => {
                entries.push((o as u64, Bytes::from(d)))
            }
            (o, d) => return Err(format!("unexpected history entry {o:?} {d:?}")),
        }
    }
    Ok(Range {
        epoch,
        top,
        entries,
    })
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
            Value::Int(8),
            bulk("a"),
            Value::Int(9),
            bulk("b"),
        ]))
        .expect("parses");
        assert_eq!(r.epoch.as_deref(), Some(&b"ep"[..]));
        assert_eq!(r.top, 9);
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[1], (9, Bytes::from_static(b"b")));
        let none = parse_range(Value::Array(vec![Value::Nil, Value::Int(0)])).expect("nil");
        assert_eq!(none, Range::default());
        for bad in [
            Value::Int(1),
            Value::Array(vec![]),
            Value::Array(vec![bulk("e")]),
            Value::Array(vec![bulk("e"), Value::Int(1), Value::Int(1)]),
            Value::Array(vec![bulk("e"), Value::Int(1), bulk("x"), bulk("y")]),
        ] {
            assert!(parse_range(bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_share_the_channel_hash_tag() {
        let h = History {
            size: 10,
            ttl: 60,
            instance: "i1".into(),
            max_entry: 100,
        };
        let c = String::from_utf8(
            h.publish("sha", "p:room", &[(7, b"x")])
                .get_packed_command(),
        )
        .expect("utf8");
        for k in ["{p:room}:m", "{p:room}:s", "{p:room}:p:i1"] {
            assert!(c.contains(k), "{k} in {c}");
        }
        assert_eq!(keys("c"), ("{c}:m".to_string(), "{c}:s".to_string()));
    }
}
