//! Standalone history, in memory: per channel an epoch, offsets 1, 2, 3… and the last
//! `--history-size` messages, forgotten `--history-ttl` after the channel's last publish.
//! The whole is bounded by `--history-memory-bytes`: beyond it, the channel published
//! to longest ago loses its history (its next publish starts a new epoch, as in Redis
//! when a key is evicted). Sans-IO: time is passed in. A leaf.
//!
//! [`MemHistory::since`] answers "everything after offset N of epoch E", which a later
//! client protocol serves to reconnecting clients.

use crate::ws::Kind;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Bytes counted per entry on top of its payload (offset, kind, `Bytes` handle).
const ENTRY_OVERHEAD: usize = 48;
/// Bytes counted per channel (name, epoch, map slot).
const CHANNEL_OVERHEAD: usize = 160;

#[derive(Debug)]
struct Hist {
    epoch: Bytes,
    top: u64,
    entries: VecDeque<(u64, Kind, Bytes)>,
    bytes: usize,
    last_at: Instant,
}

/// One process's history of every channel.
#[derive(Debug)]
pub struct MemHistory {
    size: usize,
    ttl: Duration,
    max_bytes: usize,
    bytes: usize,
    /// Random per process start; a channel's epoch is this plus a counter.
    base: u64,
    made: u64,
    chans: HashMap<Box<str>, Hist>,
}

/// What [`MemHistory::since`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Since {
    /// The messages after the offset asked for (maybe none), in order.
    Messages(Vec<(u64, Kind, Bytes)>),
    /// The epoch is not the channel's current one (or history has moved past the
    /// offset): the caller cannot be brought up to date from here.
    Lost,
}

impl MemHistory {
    pub fn new(size: usize, ttl: Duration, max_bytes: usize) -> MemHistory {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        MemHistory {
            size,
            ttl,
            max_bytes,
            bytes: 0,
            base: h.finish(),
            made: 0,
            chans: HashMap::new(),
        }
    }

    /// Appends a message; returns its position (epoch, offset).
    pub fn append(&mut self, channel: &str, kind: Kind, payload: Bytes, now: Instant) -> u64 {
        if self.size == 0 {
            return 0;
        }
        if !self.chans.contains_key(channel) {
            self.made += 1;
            let epoch = Bytes::from(format!("{:08x}{:x}", self.base as u32, self.made));
            self.bytes += CHANNEL_OVERHEAD + channel.len();
            self.chans.insert(
                channel.into(),
                Hist {
                    epoch,
                    top: 0,
                    entries: VecDeque::new(),
                    bytes: 0,
                    last_at: now,
                },
            );
        }
        let Some(h) = self.chans.get_mut(channel) else {
            return 0;
        };
        h.top += 1;
        h.last_at = now;
        let cost = payload.len() + ENTRY_OVERHEAD;
        h.entries.push_back((h.top, kind, payload));
        h.bytes += cost;
        self.bytes += cost;
        while h.entries.len() > self.size {
            if let Some((_, _, p)) = h.entries.pop_front() {
                h.bytes -= p.len() + ENTRY_OVERHEAD;
                self.bytes -= p.len() + ENTRY_OVERHEAD;
            }
        }
        let top = h.top;
        if self.bytes > self.max_bytes {
            self.evict(channel);
        }
        top
    }

    /// Drops whole channels, published to longest ago first, until under 7/8 of the
    /// limit (so a full store does not scan on every publish). `keep` goes last.
    fn evict(&mut self, keep: &str) {
        let mut order: Vec<(Instant, Box<str>)> = self
            .chans
            .iter()
            .filter(|(k, _)| &***k != keep)
            .map(|(k, h)| (h.last_at, k.clone()))
            .collect();
        order.sort();
        let target = self.max_bytes / 8 * 7;
        for (_, name) in order {
            if self.bytes <= target {
                return;
            }
            self.remove(&name);
        }
        // One channel alone is over: trim its oldest entries.
        if let Some(h) = self.chans.get_mut(keep) {
            while self.bytes > target && h.entries.len() > 1 {
                if let Some((_, _, p)) = h.entries.pop_front() {
                    h.bytes -= p.len() + ENTRY_OVERHEAD;
                    self.bytes -= p.len() + ENTRY_OVERHEAD;
                }
            }
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some(h) = self.chans.remove(name) {
            self.bytes -= h.bytes + CHANNEL_OVERHEAD + name.len();
        }
    }

    /// Forgets channels quiet for longer than the TTL.
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.ttl;
        let old: Vec<Box<str>> = self
            .chans
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.last_at) > ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for name in old {
            self.remove(&name);
        }
    }

    /// Everything after `offset` of `epoch` on `channel`.
    pub fn since(&self, channel: &str, epoch: &[u8], offset: u64) -> Since {
        let Some(h) = self.chans.get(channel) else {
            return Since::Lost;
        };
        if h.epoch != epoch || offset > h.top {
            return Since::Lost;
        }
        let first = h.entries.front().map_or(h.top + 1, |e| e.0);
        if offset + 1 < first {
            return Since::Lost;
        }
        Since::Messages(h.entries.iter().filter(|e| e.0 > offset).cloned().collect())
    }

    /// The channel's current epoch and top offset.
    pub fn top(&self, channel: &str) -> Option<(Bytes, u64)> {
        self.chans.get(channel).map(|h| (h.epoch.clone(), h.top))
    }

    /// Bytes counted (payloads plus bookkeeping), within `--history-memory-bytes`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn channels(&self) -> usize {
        self.chans.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn offsets_count_up_and_size_keeps_the_newest() {
        let now = Instant::now();
        let mut h = MemHistory::new(3, Duration::from_secs(60), 1 << 20);
        for i in 1..=5 {
            assert_eq!(h.append("c", Kind::Text, p(&format!("m{i}")), now), i);
        }
        let (epoch, top) = h.top("c").expect("has history");
        assert_eq!(top, 5);
        let Since::Messages(m) = h.since("c", &epoch, 2) else {
            panic!("2 is just before the oldest kept (3)");
        };
        assert_eq!(m.iter().map(|e| e.0).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(h.since("c", &epoch, 1), Since::Lost, "1..2 trimmed");
        assert_eq!(h.since("c", b"other", 4), Since::Lost);
        assert_eq!(h.since("c", &epoch, 5), Since::Messages(vec![]));
    }

    #[test]
    fn quiet_channels_expire_and_come_back_with_a_new_epoch() {
        let t0 = Instant::now();
        let mut h = MemHistory::new(10, Duration::from_secs(60), 1 << 20);
        h.append("c", Kind::Text, p("x"), t0);
        let (e1, _) = h.top("c").expect("history");
        h.expire(t0 + Duration::from_secs(30));
        assert_eq!(h.channels(), 1);
        h.expire(t0 + Duration::from_secs(61));
        assert_eq!((h.channels(), h.bytes()), (0, 0));
        assert_eq!(h.append("c", Kind::Text, p("y"), t0), 1);
        assert_ne!(h.top("c").expect("history").0, e1);
    }

    #[test]
    fn memory_stays_under_the_limit_dropping_the_stalest_channel() {
        let t0 = Instant::now();
        let mut h = MemHistory::new(1000, Duration::from_secs(60), 64 * 1024);
        for i in 0..2000u64 {
            let ch = format!("c{}", i % 50);
            h.append(
                &ch,
                Kind::Binary,
                Bytes::from(vec![0u8; 500]),
                t0 + Duration::from_millis(i),
            );
            assert!(h.bytes() <= 64 * 1024, "{} at {i}", h.bytes());
        }
        assert!(h.top("c49").is_some(), "the newest channel kept");
        // One channel alone over the limit keeps its newest messages.
        let mut h = MemHistory::new(1000, Duration::from_secs(60), 8 * 1024);
        for i in 1..=100 {
            h.append("big", Kind::Binary, Bytes::from(vec![0u8; 500]), t0);
            assert!(h.bytes() <= 8 * 1024);
            assert_eq!(h.top("big").expect("kept").1, i);
        }
        let off = h.append("off", Kind::Text, p("x"), t0);
        let mut z = MemHistory::new(0, Duration::from_secs(1), 1);
        assert_eq!((off > 0, z.append("c", Kind::Text, p("x"), t0)), (true, 0));
    }
}
