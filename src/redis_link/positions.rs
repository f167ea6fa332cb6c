//! Gap repair, sans-IO: for each subscribed channel, the last position this instance
//! delivered (epoch, offset), the live messages held while a gap is read from history,
//! and the history reads wanted and in flight. Inputs are positioned messages from the
//! subscription link, channels (re)confirmed, history ranges read on the publish link
//! and the publish link going down; outputs are deliveries, in order and once, and the
//! reads to send. No sockets, no clock.
//!
//! The rules:
//! * A channel's position starts when it is first confirmed: a *position read* (the
//!   read script with `from` 0) returns its epoch and top offset, and no entries —
//!   members joined now, nothing older is theirs. Until a live message goes past that
//!   top, live messages at or below it were published after the SUBSCRIBE took effect
//!   and are delivered (in order, once). So even a channel that was quiet when a link
//!   dropped knows where to read from. A live message before the reply starts the
//!   position itself.
//! * Offset `last + 1` of the same epoch is delivered at once; one at or below `last` is
//!   a duplicate (dropped, counted); one further ahead is held and the gap is read from
//!   history (`last + 1 ..`), then everything is delivered in order.
//! * A channel confirmed again after the subscription link came back reads its history
//!   from `last + 1` (live messages meanwhile are held or, if next in line, delivered).
//! * Another epoch (Redis lost the channel's history and a new one began) is a reset:
//!   counted, and the new epoch is delivered from its first offset still in history.
//! * Held messages are bounded (`--history-hold-bytes` over all channels). Beyond it a
//!   live message is not held but remembered as "behind": it has an offset, so it is in
//!   history and is read from there once the gap before it is filled. Nothing is lost
//!   while history holds it.
//! * What history no longer holds (trimmed by `--history-size`, expired by
//!   `--history-ttl`, or lost with Redis's data) is skipped and counted as missed.

use crate::backplane::{BusEvent, HistoryStats};
use crate::envelope::{self, Position};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Bookkeeping bytes counted per held message on top of its payload.
const HELD_OVERHEAD: usize = 64;

/// A history read the shell should send on the publish link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReq {
    pub channel: Box<str>,
    /// The epoch the instance knows; history of another epoch is read from its start.
    pub epoch: Bytes,
    pub from: u64,
    /// Matches the reply to this request (a channel left and joined again meanwhile
    /// has a new serial).
    pub serial: u64,
}

/// What a history read returned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Range {
    /// `None`: the channel has no history (never published, expired, or lost).
    pub epoch: Option<Bytes>,
    /// The channel's top offset when the read ran.
    pub top: u64,
    /// Offsets and envelope-encoded bodies, ascending; maybe cut short by the read's
    /// byte limit (then `top` is beyond the last).
    pub entries: Vec<(u64, Bytes)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Idle,
    /// To be sent when the publish link can take it.
    Wanted,
    InFlight(u64),
}

#[derive(Debug)]
struct Chan {
    epoch: Option<Bytes>,
    /// Last offset delivered (0: none of this epoch yet).
    last: u64,
    /// Live messages ahead of `last + 1`, by offset (envelope-encoded bodies).
    hold: BTreeMap<u64, Bytes>,
    /// Highest offset seen live but not held (hold limit): read from history.
    behind: u64,
    read: Read,
    /// `last` came from a position read, not a delivery: live messages up to it are
    /// still to deliver; this is the highest delivered so far (`None`: not provisional).
    provisional: Option<u64>,
}

impl Chan {
    fn new() -> Chan {
        Chan {
            epoch: None,
            last: 0,
            hold: BTreeMap::new(),
            behind: 0,
            read: Read::Idle,
            provisional: None,
        }
    }
}

/// A reset to log (the shell rate-limits the lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reset {
    pub channel: String,
    pub old: Bytes,
    pub new: Bytes,
}

/// Every subscribed channel's position.
#[derive(Debug)]
pub struct Positions {
    chans: HashMap<Box<str>, Chan>,
    /// Reads wanted, in the order they became wanted.
    to_read: VecDeque<Box<str>>,
    max_hold_bytes: usize,
    hold_bytes: usize,
    max_payload: usize,
    serial: u64,
    pub stats: HistoryStats,
    /// Resets since the shell last took them (for the log).
    pub resets: Vec<Reset>,
}

impl Positions {
    pub fn new(max_hold_bytes: usize, max_payload: usize) -> Positions {
        Positions {
            chans: HashMap::new(),
            to_read: VecDeque::new(),
            max_hold_bytes,
            hold_bytes: 0,
            max_payload,
            serial: 0,
            stats: HistoryStats::default(),
            resets: Vec::new(),
        }
    }

    /// Bytes of held messages (all channels).
    pub fn held_bytes(&self) -> usize {
        self.hold_bytes
    }

    /// Channels with a position.
    pub fn len(&self) -> usize {
        self.chans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chans.is_empty()
    }

    /// The channel's last delivered position, if any (for a later client-facing
    /// "everything after offset N of epoch E").
    pub fn last(&self, channel: &str) -> Option<(Bytes, u64)> {
        let c = self.chans.get(channel)?;
        Some((c.epoch.clone()?, c.last))
    }

    /// The last local member left: the position is forgotten (a later member starts
    /// from the channel's newest message).
    pub fn forget(&mut self, channel: &str) {
        if let Some(c) = self.chans.remove(channel) {
            self.hold_bytes -= held_size(&c.hold);
        }
    }

    /// A live message from the subscription link.
    pub fn on_message(
        &mut self,
        channel: &str,
        pos: Option<Position>,
        body: Bytes,
        out: &mut Vec<BusEvent>,
    ) {
        let Some(pos) = pos else {
            // No position (a foreign publisher, or history off there): deliver as is.
            return self.deliver(channel, body, out);
        };
        let c = match self.chans.get_mut(channel) {
            Some(c) => c,
            None => self.chans.entry(channel.into()).or_insert_with(Chan::new),
        };
        match &c.epoch {
            None => {
                c.epoch = Some(pos.epoch.clone());
                c.last = pos.offset.saturating_sub(1);
            }
            // Confirmed while the channel had no history: its first epoch is new to
            // everyone, from offset 1.
            Some(e) if e.is_empty() => {
                c.epoch = Some(pos.epoch.clone());
                c.last = 0;
            }
            Some(e) if *e != pos.epoch => {
                let old = e.clone();
                self.reset(channel, old, pos.epoch.clone());
            }
            Some(_) => {}
        }
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        if let Some(delivered) = c.provisional {
            if pos.offset <= c.last {
                if pos.offset <= delivered {
                    self.stats.duplicates += 1;
                    return;
                }
                c.provisional = Some(pos.offset);
                return self.deliver(channel, body, out);
            }
            c.provisional = None;
        }
        if pos.offset <= c.last {
            self.stats.duplicates += 1;
            return;
        }
        if pos.offset == c.last + 1 && c.hold.is_empty() {
            c.last = pos.offset;
            return self.deliver(channel, body, out);
        }
        let size = body.len() + HELD_OVERHEAD;
        let fits = self.hold_bytes + size <= self.max_hold_bytes;
        match c.hold.entry(pos.offset) {
            std::collections::btree_map::Entry::Occupied(_) => self.stats.duplicates += 1,
            std::collections::btree_map::Entry::Vacant(v) if fits => {
                v.insert(body);
                self.hold_bytes += size;
            }
            std::collections::btree_map::Entry::Vacant(_) => {
                self.stats.hold_overflows += 1;
                c.behind = c.behind.max(pos.offset);
            }
        }
        self.release(channel, out);
        self.want_read_if_gap(channel);
    }

    /// The channel is (again) confirmed on a new subscription link: what was published
    /// while it was not is read from history.
    pub fn on_confirmed(&mut self, channel: &str) {
        let c = match self.chans.get_mut(channel) {
            Some(c) => c,
            None => self.chans.entry(channel.into()).or_insert_with(Chan::new),
        };
        if c.epoch.is_some() {
            c.behind = u64::MAX; // unknown how far: read to the top
        }
        // No position yet: a position read (epoch and top only).
        self.want_read(channel);
    }

    /// The publish link went down: reads in flight will get no reply; they are
    /// wanted again.
    pub fn on_publish_link_down(&mut self) {
        let mut again: Vec<Box<str>> = Vec::new();
        for (name, c) in &mut self.chans {
            if matches!(c.read, Read::InFlight(_)) {
                c.read = Read::Wanted;
                again.push(name.clone());
            }
        }
        again.sort(); // deterministic order (tests)
        self.to_read.extend(again);
    }

    /// The next read to send, if any (marked in flight).
    pub fn next_read(&mut self) -> Option<ReadReq> {
        while let Some(name) = self.to_read.pop_front() {
            let Some(c) = self.chans.get_mut(&name) else {
                continue;
            };
            if c.read != Read::Wanted {
                continue;
            }
            self.serial += 1;
            c.read = Read::InFlight(self.serial);
            self.stats.reads += 1;
            let (epoch, from) = match &c.epoch {
                Some(e) => (e.clone(), c.last + 1),
                None => (Bytes::new(), 0), // a position read
            };
            return Some(ReadReq {
                channel: name,
                epoch,
                from,
                serial: self.serial,
            });
        }
        None
    }

    /// The reply to a read.
    pub fn on_range(&mut self, req: &ReadReq, r: Range, out: &mut Vec<BusEvent>) {
        let channel = &*req.channel;
        let Some(c) = self.chans.get_mut(channel) else {
            return; // forgotten meanwhile
        };
        if c.read != Read::InFlight(req.serial) {
            return; // a read from before the channel was left and joined again
        }
        c.read = Read::Idle;
        if req.from == 0 {
            // A position read: the position starts at the top, unless a live message
            // started it meanwhile.
            if c.epoch.is_none() {
                match r.epoch {
                    Some(e) => {
                        c.epoch = Some(e);
                        c.last = r.top;
                        c.provisional = Some(0);
                    }
                    // No history yet: whatever epoch comes is delivered from offset 1.
                    None => c.epoch = Some(Bytes::new()),
                }
            }
            return;
        }
        let Some(epoch) = r.epoch else {
            // No history at all: whatever the gap held is gone.
            return self.skip_gap(channel, out);
        };
        match &c.epoch {
            Some(e) if e.is_empty() => {
                c.epoch = Some(epoch);
                c.last = 0;
            }
            Some(e) if *e == epoch => {}
            other => {
                let old = other.clone().unwrap_or_default();
                self.reset(channel, old, epoch);
            }
        }
        let mut last_read = 0;
        for (offset, body) in r.entries {
            last_read = offset;
            let Some(c) = self.chans.get_mut(channel) else {
                return;
            };
            if offset <= c.last {
                continue; // delivered live meanwhile
            }
            if offset > c.last + 1 {
                self.stats.missed += offset - c.last - 1;
            }
            c.last = offset;
            match c.hold.remove(&offset) {
                Some(held) => self.hold_bytes -= held.len() + HELD_OVERHEAD,
                None => self.stats.repaired += 1, // it had not arrived live
            }
            self.deliver(channel, body, out);
        }
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        let held_below: Vec<u64> = c.hold.range(..=c.last).map(|(o, _)| *o).collect();
        for o in held_below {
            if let Some(b) = c.hold.remove(&o) {
                self.hold_bytes -= b.len() + HELD_OVERHEAD;
            }
        }
        self.release(channel, out);
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        if last_read < r.top && c.last < r.top {
            // Cut short by the read's byte limit: read on.
            return self.want_read(channel);
        }
        if c.behind != u64::MAX && c.behind <= c.last {
            c.behind = 0;
        }
        if c.behind == u64::MAX {
            c.behind = 0; // read to the top: caught up
        }
        match c.hold.keys().next().copied() {
            // History ended below the next held one: what lies between is gone.
            Some(first) if r.top + 1 >= first => self.skip_gap(channel, out),
            // Published after the read ran, yet missed live: read again.
            Some(_) => self.want_read(channel),
            None if c.behind > c.last => self.want_read(channel),
            None => {}
        }
    }

    /// Gives up on the gap before the first held message (history has none of it):
    /// counts it missed and delivers what is held.
    fn skip_gap(&mut self, channel: &str, out: &mut Vec<BusEvent>) {
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        let next = match (c.hold.keys().next().copied(), c.behind) {
            (Some(first), _) => first,
            (None, b) if b > c.last && b != u64::MAX => b + 1,
            _ => {
                c.behind = 0;
                return;
            }
        };
        self.stats.missed += next - c.last - 1;
        c.last = next - 1;
        if c.behind <= c.last || c.behind == u64::MAX {
            c.behind = 0;
        }
        self.release(channel, out);
    }

    /// Another epoch: counted, position back to the start of the new one.
    fn reset(&mut self, channel: &str, old: Bytes, new: Bytes) {
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        self.hold_bytes -= held_size(&c.hold);
        c.hold.clear();
        c.epoch = Some(new.clone());
        c.last = 0;
        c.behind = 0;
        c.provisional = None;
        self.stats.resets += 1;
        self.resets.push(Reset {
            channel: channel.to_string(),
            old,
            new,
        });
    }

    /// Delivers held messages that are next in line.
    fn release(&mut self, channel: &str, out: &mut Vec<BusEvent>) {
        loop {
            let Some(c) = self.chans.get_mut(channel) else {
                return;
            };
            let next = c.last + 1;
            let Some(body) = c.hold.remove(&next) else {
                return;
            };
            self.hold_bytes -= body.len() + HELD_OVERHEAD;
            c.last = next;
            self.deliver(channel, body, out);
        }
    }

    fn want_read_if_gap(&mut self, channel: &str) {
        let Some(c) = self.chans.get(channel) else {
            return;
        };
        if !c.hold.is_empty() || c.behind > c.last {
            self.want_read(channel);
        }
    }

    fn want_read(&mut self, channel: &str) {
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        if c.read == Read::Idle {
            c.read = Read::Wanted;
            self.to_read.push_back(channel.into());
        }
    }

    fn deliver(&mut self, channel: &str, body: Bytes, out: &mut Vec<BusEvent>) {
        let (kind, payload) = envelope::decode(body);
        if payload.len() > self.max_payload {
            self.stats.oversize += 1;
            return;
        }
        out.push(BusEvent::Deliver {
            channel: channel.to_string(),
            kind,
            payload,
        });
    }
}

fn held_size(hold: &BTreeMap<u64, Bytes>) -> usize {
    hold.values().map(|b| b.len() + HELD_OVERHEAD).sum()
}

#[cfg(test)]
#[path = "positions_tests.rs"]
mod tests;
