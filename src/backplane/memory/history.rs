//! Standalone history, in memory: per channel an epoch, offsets 1, 2, 3… and the last
//! `--history-size` messages, forgotten `--history-ttl` after the channel's last publish.
//! The whole is bounded by `--history-memory-bytes`, counted as the heap spends it (each
//! allocation's real size, the channel table sized once): beyond it, the channel
//! published to longest ago loses its history (its next publish starts a new epoch, as
//! in Redis when a key is evicted). A million channels of tiny messages stay within
//! ~1.1x of what is counted in RSS (`cargo bench --bench e2e`, phase `history`).
//! Sans-IO: time is passed in. A leaf.
//!
//! [`MemHistory::since`] answers "everything after offset N of epoch E", which a later
//! client protocol serves to reconnecting clients.

use crate::ws::Kind;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// One entry in a channel's ring: offset, kind, `Bytes` handle.
const ENTRY: usize = std::mem::size_of::<(u64, Kind, Bytes)>();
/// One slot of the channel map: the name's box, the `Hist`, and hashbrown's control byte.
const SLOT: usize = std::mem::size_of::<(Box<str>, Hist)>() + 1;

/// What an allocation of `n` bytes really takes from the heap (glibc malloc: 8 bytes of
/// header, rounded up to 16, at least 32), so the limit is on memory, not on payloads:
/// 1M channels of tiny messages cost several times their payload in bookkeeping.
fn alloc_cost(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        ((n + 8 + 15) & !15).max(32)
    }
}

/// The table's size: its buckets (a power of two) take at most half the limit. It holds
/// at most half its capacity in channels (`MemHistory::max_chans`): hashbrown then
/// clears deleted entries in place instead of growing. Full, the stalest channels go,
/// as when the bytes run out.
fn table_capacity(max_bytes: usize) -> usize {
    let buckets = (max_bytes / 2 / SLOT).max(8);
    let pow = if buckets.is_power_of_two() {
        buckets
    } else {
        buckets.next_power_of_two() / 2
    };
    pow / 8 * 7
}

/// What one entry costs: its payload's allocation and the shared header `Bytes` adds
/// once the payload is also handed to the fan-out (a clone). Its slot in the ring is
/// counted with the ring (`ring_cost`).
fn entry_cost(payload: &Bytes) -> usize {
    alloc_cost(payload.len()) + alloc_cost(24)
}

/// What a ring of `capacity` entries costs.
fn ring_cost(capacity: usize) -> usize {
    alloc_cost(capacity * ENTRY)
}

#[derive(Debug)]
struct Hist {
    /// The epoch's number (rendered by `epoch_of`): 8 bytes instead of an allocation.
    epoch: u64,
    top: u64,
    entries: VecDeque<(u64, Kind, Bytes)>,
    /// Bytes counted for this channel: name, ring buffer, entries.
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
    /// Bytes counted for the map's table (`capacity() * SLOT`), part of `bytes`.
    map_bytes: usize,
    /// Channels kept at most: half the table's initial capacity (see `table_capacity`).
    max_chans: usize,
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
            // Sized once (`table_capacity`), so it never rehashes: a rehash leaves the
            // old table resident (measured: RSS 1.33x the limit for a million tiny
            // channels with a growing table, 1.2x with this).
            chans: HashMap::with_capacity(if size == 0 {
                0
            } else {
                table_capacity(max_bytes)
            }),
            map_bytes: 0,
            max_chans: 0,
        }
        .counted()
    }

    fn counted(mut self) -> MemHistory {
        self.max_chans = self.chans.capacity() / 2;
        self.recount_map();
        self
    }

    fn epoch_of(&self, n: u64) -> Bytes {
        Bytes::from(format!("{:08x}{:x}", self.base as u32, n))
    }

    /// Counts the map's table (sized once).
    fn recount_map(&mut self) {
        let buckets = (self.chans.capacity() * 8 / 7).next_power_of_two();
        let now = alloc_cost(buckets * SLOT);
        self.bytes = self.bytes + now - self.map_bytes;
        self.map_bytes = now;
    }

    /// Appends a message; returns its position (epoch, offset).
    pub fn append(&mut self, channel: &str, kind: Kind, payload: Bytes, now: Instant) -> u64 {
        if self.size == 0 {
            return 0;
        }
        self.ensure_channel(channel, now);
        let Some(h) = self.chans.get_mut(channel) else {
            return 0;
        };
        h.top += 1;
        h.last_at = now;
        let ring = h.entries.capacity();
        let cost = entry_cost(&payload);
        h.entries.push_back((h.top, kind, payload));
        let grown = ring_cost(h.entries.capacity()) - ring_cost(ring);
        h.bytes += cost + grown;
        self.bytes += cost + grown;
        while h.entries.len() > self.size {
            if let Some((_, _, p)) = h.entries.pop_front() {
                h.bytes -= entry_cost(&p);
                self.bytes -= entry_cost(&p);
            }
        }
        let top = h.top;
        if self.bytes > self.max_bytes {
            self.evict(channel);
        }
        top
    }

    /// Drops whole channels, published to longest ago first, until under 7/8 of the
    /// limit (so a full store does not scan on every publish). `keep` goes last. No
    /// channel name is copied: the cut-off time is found first, then the map is
    /// filtered in place (copies of a million names would fragment the heap).
    fn evict(&mut self, keep: &str) {
        let target = self.max_bytes / 8 * 7;
        let mut count_over = self.chans.len().saturating_sub(self.max_chans / 8 * 7);
        let mut ages: Vec<(Instant, usize)> = self
            .chans
            .iter()
            .filter(|(k, _)| &***k != keep)
            .map(|(_, h)| (h.last_at, h.bytes))
            .collect();
        ages.sort_unstable_by_key(|a| a.0);
        let mut over = self.bytes.saturating_sub(target);
        // The cut-off time, and how many channels of exactly that age go (many are
        // published to in one loop iteration and share it).
        let mut cutoff: Option<(Instant, usize)> = None;
        for (at, bytes) in ages {
            if over == 0 && count_over == 0 {
                break;
            }
            over = over.saturating_sub(bytes);
            count_over = count_over.saturating_sub(1);
            cutoff = match cutoff {
                Some((t, n)) if t == at => Some((t, n + 1)),
                _ => Some((at, 1)),
            };
        }
        if let Some((cutoff, mut at_cutoff)) = cutoff {
            let mut freed = 0;
            self.chans.retain(|k, h| {
                let go =
                    &**k != keep && (h.last_at < cutoff || (h.last_at == cutoff && at_cutoff > 0));
                if go {
                    if h.last_at == cutoff {
                        at_cutoff -= 1;
                    }
                    freed += h.bytes;
                }
                !go
            });
            self.bytes -= freed;
        }
        if self.bytes <= target {
            return;
        }
        // One channel alone is over: trim its oldest entries.
        if let Some(h) = self.chans.get_mut(keep) {
            while self.bytes > target && h.entries.len() > 1 {
                if let Some((_, _, p)) = h.entries.pop_front() {
                    h.bytes -= entry_cost(&p);
                    self.bytes -= entry_cost(&p);
                }
            }
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some(h) = self.chans.remove(name) {
            self.bytes -= h.bytes;
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
        if self.epoch_of(h.epoch) != epoch || offset > h.top {
            return Since::Lost;
        }
        let first = h.entries.front().map_or(h.top + 1, |e| e.0);
        if offset + 1 < first {
            return Since::Lost;
        }
        Since::Messages(h.entries.iter().filter(|e| e.0 > offset).cloned().collect())
    }

    /// The channel's position, beginning a history (an epoch, offset 0) if it has none:
    /// a client is about to be told where it is. `None` with history off.
    pub fn begin(&mut self, channel: &str, now: Instant) -> Option<crate::message::StreamPosition> {
        if self.size == 0 {
            return None;
        }
        self.ensure_channel(channel, now);
        self.position(channel)
    }

    /// A channel's history, begun (a new epoch, offset 0) if it has none. The table
    /// never grows (see `new`): full, the stalest channels go first.
    fn ensure_channel(&mut self, channel: &str, now: Instant) {
        if self.chans.contains_key(channel) {
            return;
        }
        if self.chans.len() >= self.max_chans {
            self.evict(channel);
        }
        self.made += 1;
        let cost = alloc_cost(channel.len()) + ring_cost(1);
        self.bytes += cost;
        self.chans.insert(
            channel.into(),
            Hist {
                epoch: self.made,
                top: 0,
                // One slot at first: a channel with one message is the common case
                // (the default would be four).
                entries: VecDeque::with_capacity(1),
                bytes: cost,
                last_at: now,
            },
        );
    }

    /// The channel's current position (epoch and top offset), `None` without history.
    pub fn position(&self, channel: &str) -> Option<crate::message::StreamPosition> {
        let h = self.chans.get(channel)?;
        let epoch = crate::message::Epoch::new(self.epoch_of(h.epoch))?;
        Some(crate::message::StreamPosition::new(epoch, h.top))
    }

    /// Up to `limit` entries after `offset` that history still holds (a trimmed start
    /// skipped), oldest first.
    pub fn window(&self, channel: &str, offset: u64, limit: usize) -> Vec<(u64, Kind, Bytes)> {
        self.chans.get(channel).map_or_else(Vec::new, |h| {
            h.entries
                .iter()
                .filter(|e| e.0 > offset)
                .take(limit)
                .cloned()
                .collect()
        })
    }

    /// The channel's current epoch and top offset.
    pub fn top(&self, channel: &str) -> Option<(Bytes, u64)> {
        self.chans
            .get(channel)
            .map(|h| (self.epoch_of(h.epoch), h.top))
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
        assert_eq!(h.channels(), 0);
        assert_eq!(h.bytes(), h.map_bytes, "only the (empty) table is left");
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

    /// 300,000 tiny channels: what is counted stays within the limit, the channel
    /// table never rehashes (a rehash leaves the old table resident), and the count
    /// includes what the heap really spends (`cargo bench --bench e2e`, phase
    /// `history`, measures RSS for a million: 1.1x what is counted).
    #[test]
    fn many_tiny_channels_stay_within_the_limit_and_the_table_never_grows() {
        let t0 = Instant::now();
        let cap = 1 << 20;
        let mut h = MemHistory::new(100, Duration::from_secs(60), cap);
        let table = h.chans.capacity();
        assert!(
            table > 0 && h.bytes() <= cap / 2,
            "{table} slots, {} bytes",
            h.bytes()
        );
        for i in 0..300_000u64 {
            h.append(
                &format!("c{i}"),
                Kind::Text,
                p("hi"),
                t0 + Duration::from_micros(i),
            );
            assert!(h.bytes() <= cap);
        }
        assert!(h.chans.capacity() <= table, "the table did not grow");
        assert!(h.channels() <= table / 2);
        let per = (h.bytes() - h.map_bytes) / h.channels();
        assert!(per >= 150, "{per} bytes counted per one-message channel");
        assert!(
            h.bytes() > cap / 2,
            "the limit is used: {} ({} channels, table {table})",
            h.bytes(),
            h.channels()
        );
    }
}
