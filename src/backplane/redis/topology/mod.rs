//! Where Redis is beyond one address: `sentinel` (a primary found and followed
//! through Redis Sentinel) and `cluster` (Redis Cluster as one backplane), and here
//! the cluster's topology, sans-IO: the hash slot of a key, and which primary serves
//! which slots, parsed from `CLUSTER SHARDS` (Redis ≥ 7) or `CLUSTER SLOTS` (older).
//! Everything a node says is input: a reply that does not cover slots with sane
//! addresses is an error, never a partial table taken on trust.

pub mod cluster;
pub mod sentinel;

use redis::Value;

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16/XMODEM (polynomial 0x1021), what Redis Cluster hashes keys with.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key (or a shard channel): only the part between the first `{` and
/// the next `}` is hashed, if that part is not empty (Redis's hash tags).
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// A primary and the slot ranges it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub host: String,
    pub port: u16,
    /// Inclusive ranges.
    pub slots: Vec<(u16, u16)>,
}

/// Which primary serves each slot (index into `shards`; `None`: no one, the cluster
/// is down for that slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub shards: Vec<Shard>,
    /// Every node the answer named that is not failed (primaries and replicas): where
    /// to ask next time if the node asked is gone.
    pub nodes: Vec<(String, u16)>,
}

impl Topology {
    /// The primary serving `slot`, if any.
    pub fn owner(&self, slot: u16) -> Option<&Shard> {
        self.shards
            .iter()
            .find(|s| s.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn slot_of(v: &Value) -> Result<u16, String> {
    int(v)
        .filter(|s| (0..SLOTS as i64).contains(s))
        .map(|s| s as u16)
        .ok_or_else(|| format!("slot out of range: {v:?}"))
}

fn port_of(v: Option<&Value>) -> Result<u16, String> {
    v.and_then(int)
        .filter(|p| (1..=65535).contains(p))
        .map(|p| p as u16)
        .ok_or_else(|| format!("bad port {v:?}"))
}

/// Field `name` of a RESP2 flat key/value array (or a RESP3 map).
fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .find(|kv| kv.len() == 2 && text(&kv[0]).as_deref() == Some(name))
            .map(|kv| &kv[1]),
        Value::Map(kvs) => kvs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(name))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// `CLUSTER SHARDS`: per shard its slot ranges and nodes; the node whose `role` is
/// `master` and whose `health` is `online` serves them (a shard without one serves
/// nothing until a failover ends). The address is `ip` (or `endpoint`) and `port`.
pub fn parse_shards(v: &Value) -> Result<Topology, String> {
    let Value::Array(shards) = v else {
        return Err(format!("unexpected CLUSTER SHARDS reply {v:?}"));
    };
    let mut out = Vec::new();
    let mut all_nodes: Vec<(String, u16)> = Vec::new();
    for s in shards {
        let slots = match field(s, "slots") {
            Some(Value::Array(b)) => b,
            other => return Err(format!("shard without slots: {other:?}")),
        };
        if slots.len() % 2 != 0 {
            return Err("odd slot bounds".into());
        }
        let mut ranges = Vec::new();
        for pair in slots.chunks(2) {
            let (a, b) = (slot_of(&pair[0])?, slot_of(&pair[1])?);
            if a > b {
                return Err(format!("slot range {a}-{b}"));
            }
            ranges.push((a, b));
        }
        if ranges.is_empty() {
            continue;
        }
        let nodes = match field(s, "nodes") {
            Some(Value::Array(n)) => n,
            other => return Err(format!("shard without nodes: {other:?}")),
        };
        for n in nodes {
            if field(n, "health").and_then(text).as_deref() == Some("fail") {
                continue;
            }
            let host = field(n, "ip")
                .or_else(|| field(n, "endpoint"))
                .and_then(text);
            if let (Some(h), Ok(p)) = (host, port_of(field(n, "port"))) {
                if !h.is_empty()
                    && h != "?"
                    && h.len() <= 255
                    && !all_nodes.contains(&(h.clone(), p))
                {
                    all_nodes.push((h, p));
                }
            }
        }
        let primary = nodes.iter().find(|n| {
            field(n, "role").and_then(text).as_deref() == Some("master")
                && field(n, "health").and_then(text).as_deref() != Some("fail")
        });
        let Some(p) = primary else {
            continue;
        };
        let host = field(p, "ip")
            .or_else(|| field(p, "endpoint"))
            .and_then(text)
            .filter(|h| !h.is_empty() && h != "?" && h.len() <= 255)
            .ok_or_else(|| "node without an address".to_string())?;
        let port = port_of(field(p, "port"))?;
        out.push(Shard {
            host,
            port,
            slots: ranges,
        });
    }
    check(Topology {
        shards: out,
        nodes: all_nodes,
    })
}

/// `CLUSTER SLOTS`: `[start, end, [ip, port, id…], replicas…]` per range.
pub fn parse_slots(v: &Value) -> Result<Topology, String> {
    let Value::Array(ranges) = v else {
        return Err(format!("unexpected CLUSTER SLOTS reply {v:?}"));
    };
    let mut out: Vec<Shard> = Vec::new();
    let mut all_nodes: Vec<(String, u16)> = Vec::new();
    for r in ranges {
        let Value::Array(items) = r else {
            return Err(format!("unexpected slot range {r:?}"));
        };
        let (Some(a), Some(b), Some(Value::Array(node))) =
            (items.first(), items.get(1), items.get(2))
        else {
            return Err(format!("unexpected slot range {r:?}"));
        };
        let (a, b) = (slot_of(a)?, slot_of(b)?);
        if a > b {
            return Err(format!("slot range {a}-{b}"));
        }
        let host = node
            .first()
            .and_then(text)
            .filter(|h| !h.is_empty() && h != "?" && h.len() <= 255)
            .ok_or_else(|| "node without an address".to_string())?;
        let port = port_of(node.get(1))?;
        for n in items[2..].iter() {
            if let Value::Array(n) = n {
                if let (Some(h), Ok(p)) = (n.first().and_then(text), port_of(n.get(1))) {
                    if !h.is_empty() && h != "?" && !all_nodes.contains(&(h.clone(), p)) {
                        all_nodes.push((h, p));
                    }
                }
            }
        }
        match out.iter_mut().find(|s| s.host == host && s.port == port) {
            Some(s) => s.slots.push((a, b)),
            None => out.push(Shard {
                host,
                port,
                slots: vec![(a, b)],
            }),
        }
    }
    check(Topology {
        shards: out,
        nodes: all_nodes,
    })
}

/// No slot claimed twice; at least one slot served.
fn check(t: Topology) -> Result<Topology, String> {
    let mut all: Vec<(u16, u16)> = t.shards.iter().flat_map(|s| s.slots.clone()).collect();
    if all.is_empty() {
        return Err("no slot is served (not a cluster yet, or every shard is down)".into());
    }
    all.sort();
    if all.windows(2).any(|w| w[1].0 <= w[0].1) {
        return Err("a slot is claimed by two primaries".into());
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn slots_match_redis_and_hash_tags_count() {
        // Values from `CLUSTER KEYSLOT` (Redis 7).
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(
            slot(b"{}x"),
            slot(b"{}x"),
            "an empty tag hashes the whole key"
        );
        assert_ne!(slot(b"{}x"), slot(b""));
        assert_eq!(slot(b"{room}:m"), slot(b"room"));
        assert_eq!(slot(b"a{b}c{d}"), slot(b"b"), "the first tag only");
    }

    fn node(ip: &str, port: i64, role: &str, health: &str) -> Value {
        Value::Array(vec![
            bulk("ip"),
            bulk(ip),
            bulk("port"),
            Value::Int(port),
            bulk("role"),
            bulk(role),
            bulk("health"),
            bulk(health),
        ])
    }

    fn shard(slots: &[i64], nodes: Vec<Value>) -> Value {
        Value::Array(vec![
            bulk("slots"),
            Value::Array(slots.iter().map(|s| Value::Int(*s)).collect()),
            bulk("nodes"),
            Value::Array(nodes),
        ])
    }

    #[test]
    fn shards_give_each_range_its_online_primary() {
        let v = Value::Array(vec![
            shard(
                &[0, 5460],
                vec![
                    node("10.0.0.1", 7000, "master", "online"),
                    node("10.0.0.4", 7003, "replica", "online"),
                ],
            ),
            shard(
                &[5461, 10922],
                vec![
                    node("10.0.0.2", 7001, "master", "fail"),
                    node("10.0.0.5", 7004, "master", "online"),
                ],
            ),
            shard(
                &[10923, 16383],
                vec![node("10.0.0.3", 7002, "master", "online")],
            ),
        ]);
        let t = parse_shards(&v).expect("parses");
        assert_eq!(t.shards.len(), 3);
        assert_eq!(t.owner(0).map(|s| s.port), Some(7000));
        assert_eq!(
            t.owner(6000).map(|s| s.port),
            Some(7004),
            "the failed one is skipped"
        );
        assert_eq!(t.owner(16383).map(|s| s.port), Some(7002));
        assert_eq!(
            t.nodes.len(),
            4,
            "the failed one is no place to ask: {:?}",
            t.nodes
        );
        let overlap = Value::Array(vec![
            shard(&[0, 100], vec![node("a", 1, "master", "online")]),
            shard(&[100, 200], vec![node("b", 2, "master", "online")]),
        ]);
        assert!(parse_shards(&overlap).is_err());
        for bad in [
            Value::Int(1),
            Value::Array(vec![]),
            Value::Array(vec![shard(
                &[0, 16384],
                vec![node("a", 1, "master", "online")],
            )]),
            Value::Array(vec![shard(&[5, 1], vec![node("a", 1, "master", "online")])]),
            Value::Array(vec![shard(&[0, 1], vec![node("a", 0, "master", "online")])]),
            Value::Array(vec![shard(&[0, 1], vec![node("", 1, "master", "online")])]),
        ] {
            assert!(parse_shards(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn slots_reply_groups_ranges_by_primary() {
        let range = |a: i64, b: i64, ip: &str, port: i64| {
            Value::Array(vec![
                Value::Int(a),
                Value::Int(b),
                Value::Array(vec![bulk(ip), Value::Int(port), bulk("id")]),
            ])
        };
        let v = Value::Array(vec![
            range(0, 99, "h", 1),
            range(100, 199, "g", 2),
            range(200, 16383, "h", 1),
        ]);
        let t = parse_slots(&v).expect("parses");
        assert_eq!(t.shards.len(), 2);
        assert_eq!(t.owner(150).map(|s| s.port), Some(2));
        assert_eq!(t.owner(300).map(|s| s.port), Some(1));
        assert!(parse_slots(&Value::Array(vec![range(5, 1, "h", 1)])).is_err());
    }
}
