//! Gap repair, sans-IO: for each subscribed channel, the position this instance has
//! delivered up to, the live messages held while history is read, and the reads wanted
//! and in flight. Inputs are live messages from the subscription link, channels
//! (re)confirmed, read replies from the publish link and that link going down; outputs
//! are deliveries (in order, once), `Subscribed` events and the reads to send. No
//! sockets, no clock.
//!
//! **Redis's history is the authority; a live message's position is only a claim.**
//! Anyone who may PUBLISH on the Redis can write `\0h<offset>:<epoch>:…`, so:
//!
//! * A position starts from a read, never from a live message: a channel's first
//!   SUBSCRIBE is followed by a *position read* (epoch and top offset, no entries), and
//!   its members are admitted (`Subscribed`, the held 101s go out) only when it answers.
//!   Live messages at or below that top were published before they joined.
//! * Offset `last + 1` of the confirmed epoch is delivered at once; one at or below
//!   `last` is a duplicate (dropped, counted); one further ahead is held and the gap is
//!   read from history, and history's entries, not the held copies, are delivered.
//! * Another epoch is believed only when a read finds it in the meta hash (then it is a
//!   reset: counted, logged, the new epoch delivered from its first offset still held).
//! * **One read settles every claim that arrived before it was sent:** Redis runs
//!   commands in order, and the script that published a real message ran before the
//!   message reached us, so a read sent after a claim arrived sees its offset (or its
//!   epoch). A claim the read does not confirm is forged: dropped and counted in
//!   `unconfirmed` (never delivered, never a position). So a forged envelope costs at
//!   most a share of one read, and reads never go on without new input.
//! * Every read makes progress (its reply says how far it looked) or ends; holes history
//!   no longer has (trimmed, expired, too large for this instance) are counted missed,
//!   and held messages in them are still delivered.
//! * A read's answer is applied to the request it answers only (serials), and reads of
//!   one channel are one at a time, so an old reply never moves a position back.
//! * Held messages and claims are bounded (`--history-hold-bytes` over all channels).
//!   Past it a live message of the confirmed epoch is remembered as "behind" and read
//!   from history; a claim of another epoch is dropped (if real, it is in history).

use crate::backplane::{BusEvent, HistoryStats};
use crate::envelope;
use crate::message::{Epoch, StreamPosition};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;

/// Bookkeeping bytes counted per held message on top of its payload.
const HELD_OVERHEAD: usize = 64;
/// Offsets per channel whose delivered body is remembered (as a keyed hash), so a
/// second, different message claiming one of them is seen as a conflict, not a
/// duplicate (see `Positions::on_message`).
const RECENT: usize = 4;
/// A remembered offset that had its conflict already: any further copy is a duplicate.
const SETTLED: u64 = 0;

/// Where a read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFrom {
    /// Only the epoch and the top offset: where a position starts.
    Top,
    /// The entries after this position (from the start of the history if Redis holds
    /// another epoch).
    After(StreamPosition),
    /// The entries of whatever epoch Redis holds, from its start (a channel that had no
    /// history when its members joined: all of it is new to them).
    Start,
}

/// A history read the shell should send on the publish link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReq {
    pub channel: Box<str>,
    pub from: ReadFrom,
    /// Matches the reply to this request (a channel left and joined again meanwhile
    /// has a new serial).
    pub serial: u64,
    /// The channel's reads sent so far, this one included: claims that arrived before
    /// it was sent (`seen < n`) are settled by its answer.
    n: u64,
}

impl ReadReq {
    /// The script's `(epoch, first offset)` arguments: `("", 0)` is a position read,
    /// an epoch Redis does not hold reads from the start.
    pub fn script_args(&self) -> (&[u8], u64) {
        match &self.from {
            ReadFrom::Top => (b"", 0),
            ReadFrom::After(p) => (p.epoch.as_bytes(), p.offset + 1),
            ReadFrom::Start => (b"", 1),
        }
    }
}

/// What a history read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Range {
    /// The channel has no history (never published, expired, or lost).
    None,
    At(Stream),
}

/// A channel's history as one read saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    pub epoch: Epoch,
    /// The channel's top offset when the read ran.
    pub top: u64,
    /// The first offset the read did not look at: every offset from the read's start up
    /// to here was returned or is not in the stream (trimmed, or too large). `top + 1`
    /// when the read reached the top.
    pub next: u64,
    /// The read's epoch is the one this history forked from, at this offset (a Redis
    /// that lacked the old one's tail took over; `history` module doc).
    pub fork: Option<u64>,
    /// Offsets and envelope-encoded bodies, ascending.
    pub entries: Vec<(u64, Bytes)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Idle,
    /// To be sent when the publish link can take it.
    Wanted,
    InFlight(u64),
}

/// What this instance knows of a channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    /// Nothing yet: a position read is due (or was refused).
    Unknown,
    /// A read found no history: whatever epoch begins next is new to every member.
    Empty,
    /// Confirmed epoch, and the last offset delivered (0: none of it yet).
    At(StreamPosition),
}

/// A live message waiting for history to confirm or complete it.
#[derive(Debug)]
struct Held {
    body: Bytes,
    /// The channel's reads sent when it arrived.
    seen: u64,
}

#[derive(Debug)]
struct Chan {
    known: Known,
    /// Members admitted (`Subscribed` sent): from now on nothing may be skipped silently.
    admitted: bool,
    /// Live messages of the confirmed epoch ahead of `last + 1`, by offset.
    hold: BTreeMap<u64, Held>,
    /// Live messages of an epoch not confirmed (or any, while the position is unknown).
    claims: Vec<(StreamPosition, Held)>,
    /// The highest offset of the confirmed epoch seen live but not held (hold limit),
    /// and the reads sent when it was seen.
    behind: Option<(u64, u64)>,
    /// The channel was (re)confirmed after this many reads: one sent later must reach
    /// the top before the gap of the outage is known to be read.
    catch_up: Option<u64>,
    read: Read,
    /// Reads sent for this channel.
    sent: u64,
    /// The last `RECENT` offsets delivered and a hash of each body (a ring).
    recent: [(u64, u64); RECENT],
}

impl Chan {
    fn new() -> Chan {
        Chan {
            known: Known::Unknown,
            admitted: false,
            hold: BTreeMap::new(),
            claims: Vec::new(),
            behind: None,
            catch_up: None,
            read: Read::Idle,
            sent: 0,
            recent: [(0, 0); RECENT],
        }
    }

    fn record(&mut self, offset: u64, hash: u64) {
        self.recent[offset as usize % RECENT] = (offset, hash);
    }

    fn recent_hash(&self, offset: u64) -> Option<u64> {
        let (o, h) = self.recent[offset as usize % RECENT];
        (o == offset && o != 0).then_some(h)
    }

    fn last(&self) -> u64 {
        match &self.known {
            Known::At(p) => p.offset,
            _ => 0,
        }
    }

    fn set_last(&mut self, o: u64) {
        if let Known::At(p) = &mut self.known {
            p.offset = o;
        }
    }

    fn held_bytes(&self) -> usize {
        let h: usize = self
            .hold
            .values()
            .map(|h| h.body.len() + HELD_OVERHEAD)
            .sum();
        let c: usize = self
            .claims
            .iter()
            .map(|(_, h)| h.body.len() + HELD_OVERHEAD)
            .sum();
        h + c
    }

    fn needs_read(&self) -> bool {
        !self.hold.is_empty()
            || !self.claims.is_empty()
            || self.behind.is_some()
            || self.catch_up.is_some()
    }
}

/// A history that began again (or vanished) to log (the shell rate-limits the lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reset {
    pub channel: String,
    pub old: Epoch,
    /// `None`: the history is gone (expired, or Redis lost it) and none began yet.
    pub new: Option<Epoch>,
    /// Not a reset but a fork: at which offset, and how many messages this instance
    /// delivered past it (no longer in history).
    pub fork: Option<(u64, u64)>,
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
    /// Keys the body hashes of `Chan::recent` (random per process).
    hasher: std::collections::hash_map::RandomState,
    pub stats: HistoryStats,
    /// Resets since the shell last took them (for the log).
    pub resets: Vec<Reset>,
    /// Channels whose delivered sequence has a hole since the shell last took them (a
    /// reset, or messages history no longer held): clients that track positions must
    /// be told (`BusEvent::Gap`).
    pub gaps: Vec<String>,
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
            hasher: Default::default(),
            stats: HistoryStats::default(),
            resets: Vec::new(),
            gaps: Vec::new(),
        }
    }

    /// Bytes of held messages and claims (all channels).
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

    /// The channel's last delivered position, once confirmed.
    pub fn last(&self, channel: &str) -> Option<StreamPosition> {
        match &self.chans.get(channel)?.known {
            Known::At(p) => Some(p.clone()),
            _ => None,
        }
    }

    /// Whether the channel's members are admitted (a new member may join at once).
    pub fn admitted(&self, channel: &str) -> bool {
        self.chans.get(channel).is_some_and(|c| c.admitted)
    }

    /// The last local member left: the position is forgotten (a later member starts
    /// from the channel's newest message).
    pub fn forget(&mut self, channel: &str) {
        if let Some(c) = self.chans.remove(channel) {
            self.hold_bytes -= c.held_bytes();
        }
    }

    /// The channel moves to another link (Redis Cluster: its slot moved): its
    /// confirmed position and whether members were admitted; what was held is read
    /// again there (counted here as nothing: it is not lost, it is read).
    pub fn take(&mut self, channel: &str) -> Option<(Option<StreamPosition>, bool)> {
        let c = self.chans.remove(channel)?;
        self.hold_bytes -= c.held_bytes();
        let pos = match c.known {
            Known::At(p) => Some(p),
            _ => None,
        };
        Some((pos, c.admitted))
    }

    /// A channel moved here from another link (`take`): it goes on from `pos` (its
    /// first read, once confirmed, is a catch-up from there).
    pub fn adopt(&mut self, channel: &str, pos: Option<StreamPosition>, admitted: bool) {
        let c = self.chans.entry(channel.into()).or_insert_with(Chan::new);
        if let Some(p) = pos {
            c.known = Known::At(p);
        }
        c.admitted = admitted;
    }

    /// A live message from the subscription link.
    pub fn on_message(
        &mut self,
        channel: &str,
        pos: Option<StreamPosition>,
        body: Bytes,
        out: &mut Vec<BusEvent>,
    ) {
        let Some(pos) = pos else {
            // No position (a foreign publisher, or history off there): deliver as is.
            return self.deliver(channel, None, body, out);
        };
        let c = match self.chans.get_mut(channel) {
            Some(c) => c,
            None => self.chans.entry(channel.into()).or_insert_with(Chan::new),
        };
        let seen = c.sent;
        let size = body.len() + HELD_OVERHEAD;
        let fits = self.hold_bytes + size <= self.max_hold_bytes;
        let last = match &c.known {
            Known::At(p) if p.epoch == pos.epoch => p.offset,
            _ => {
                // A claim of an epoch not confirmed: the next read settles it.
                if fits {
                    c.claims.push((pos, Held { body, seen }));
                    self.hold_bytes += size;
                } else {
                    self.stats.hold_overflows += 1;
                }
                return self.want_read(channel);
            }
        };
        let offset = pos.offset;
        let hash = self.hasher.hash_one(&body);
        if offset <= last {
            // Without a secret, a forged claim of the very next offset cannot be told
            // from the real message; whichever came first was delivered. A different
            // body for a recent offset is the other one: delivered too, and counted.
            match c.recent_hash(offset) {
                Some(h) if h != hash && h != SETTLED => {
                    c.record(offset, SETTLED);
                    self.stats.conflicts += 1;
                    return self.deliver(channel, Some(offset), body, out);
                }
                _ => self.stats.duplicates += 1,
            }
            return;
        }
        if offset == last + 1 && c.hold.is_empty() {
            c.set_last(offset);
            c.record(offset, hash);
            return self.deliver(channel, Some(offset), body, out);
        }
        match c.hold.entry(offset) {
            std::collections::btree_map::Entry::Occupied(_) => self.stats.duplicates += 1,
            std::collections::btree_map::Entry::Vacant(v) if fits => {
                v.insert(Held { body, seen });
                self.hold_bytes += size;
            }
            std::collections::btree_map::Entry::Vacant(_) => {
                self.stats.hold_overflows += 1;
                if c.behind.is_none_or(|(b, _)| b < offset) {
                    c.behind = Some((offset, seen));
                }
            }
        }
        self.release(channel, out);
        if self.chans.get(channel).is_some_and(Chan::needs_read) {
            self.want_read(channel);
        }
    }

    /// The channel is (again) confirmed on a subscription link. A new channel gets a
    /// position read (its members are admitted when it answers); a known one reads what
    /// was published while it was not subscribed.
    pub fn on_confirmed(&mut self, channel: &str, out: &mut Vec<BusEvent>) {
        let c = match self.chans.get_mut(channel) {
            Some(c) => c,
            None => self.chans.entry(channel.into()).or_insert_with(Chan::new),
        };
        c.catch_up = Some(c.sent);
        if c.admitted {
            out.push(BusEvent::Subscribed(channel.to_string()));
        }
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
            c.sent += 1;
            c.read = Read::InFlight(self.serial);
            self.stats.reads += 1;
            let from = match &c.known {
                Known::Unknown => ReadFrom::Top,
                Known::Empty => ReadFrom::Start,
                Known::At(p) => ReadFrom::After(p.clone()),
            };
            return Some(ReadReq {
                channel: name,
                from,
                serial: self.serial,
                n: c.sent,
            });
        }
        None
    }

    /// The answer to a read: `Err` when Redis refused it (or answered nonsense) for
    /// this channel; the reason is the shell's to count and log.
    pub fn on_range(&mut self, req: &ReadReq, r: Result<Range, ()>, out: &mut Vec<BusEvent>) {
        let channel = &*req.channel;
        let Some(c) = self.chans.get_mut(channel) else {
            return; // forgotten meanwhile
        };
        if c.read != Read::InFlight(req.serial) {
            return; // a read from before the channel was left and joined again
        }
        c.read = Read::Idle;
        let n = req.n;
        // Members are admitted before anything of this answer is delivered to them.
        let was_admitted = std::mem::replace(&mut c.admitted, true);
        if !was_admitted {
            out.push(BusEvent::Subscribed(channel.to_string()));
        }
        // A read that neither reached the top nor looked past its start would be sent
        // again unchanged: a reply that makes no progress counts as refused.
        let start = |s: &Stream| match &req.from {
            ReadFrom::Top => 0,
            ReadFrom::After(p) if p.epoch == s.epoch => p.offset + 1,
            ReadFrom::After(_) | ReadFrom::Start => 1,
        };
        let r = match r {
            Ok(Range::At(s)) if start(&s) > 0 && s.next <= start(&s) && s.next <= s.top => Err(()),
            other => other,
        };
        let caught_up = match r {
            Err(()) => {
                self.stats.read_refused += 1;
                self.on_refused(channel, n);
                true
            }
            Ok(Range::None) => {
                self.on_no_history(channel, n);
                true
            }
            Ok(Range::At(s)) => self.on_stream(channel, n, s, was_admitted, out),
        };
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        if caught_up && c.catch_up.is_some_and(|k| n > k) {
            c.catch_up = None;
        }
        if c.needs_read() || !caught_up {
            self.want_read(channel);
        }
    }

    /// The read was refused (a key of the wrong type, a script error, a corrupt meta
    /// hash): nothing can be confirmed, so every claim it was to settle is dropped.
    fn on_refused(&mut self, channel: &str, n: u64) {
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        let last = c.last();
        let claims = drop_settled_claims(c, n, |_| false);
        let held = drop_settled_hold(c, n, last);
        self.stats.unconfirmed += claims.0 + held.0;
        self.hold_bytes -= claims.1 + held.1;
        if c.behind.is_some_and(|(_, s)| s < n) {
            c.behind = None;
            self.stats.unconfirmed += 1;
        }
    }

    /// The channel has no history: a position read found a fresh channel, or the
    /// history a position was in is gone (expired or lost): that is a reset, and what
    /// was held of it is missed.
    fn on_no_history(&mut self, channel: &str, n: u64) {
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        if matches!(c.known, Known::At(_)) {
            self.begin_again(channel, None);
        }
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        c.known = Known::Empty;
        let dropped = drop_settled_claims(c, n, |_| false);
        self.stats.unconfirmed += dropped.0;
        self.hold_bytes -= dropped.1;
    }

    /// The history a position was in is gone (`new`: `None`) or another one began:
    /// what was held of the old one is missed, counted and logged as a reset, and the
    /// position starts over (the new epoch from offset 0, or no history at all).
    fn begin_again(&mut self, channel: &str, new: Option<Epoch>) {
        let to = match &new {
            Some(e) => Known::At(StreamPosition::new(e.clone(), 0)),
            None => Known::Empty,
        };
        if self.leave_epoch(channel, to, None) {
            self.stats.resets += 1;
        }
    }

    /// The history forked at offset `at` into `new` (another Redis took over, lacking
    /// the old one's tail, or it may have): the position goes on in the new epoch from
    /// `at` at the latest, so the new epoch's messages after it are delivered even where
    /// their offsets were given out before. What this instance delivered past `at` came
    /// from a tail Redis no longer has: counted (`fork_lost`), with what it held of
    /// that tail (missed).
    fn fork(&mut self, channel: &str, at: u64, new: Epoch) {
        let last = self.chans.get(channel).map_or(0, Chan::last);
        let lost = last.saturating_sub(at);
        let to = Known::At(StreamPosition::new(new, last.min(at)));
        if self.leave_epoch(channel, to, Some((at, lost))) {
            self.stats.forks += 1;
            self.stats.fork_lost += lost;
        }
    }

    /// The position leaves its epoch for `to` (a reset, or a fork at `fork`): what was
    /// held of the old epoch is missed, clients keeping positions are told (a gap), and
    /// it is logged. Returns whether the channel had a position to leave.
    fn leave_epoch(&mut self, channel: &str, to: Known, fork: Option<(u64, u64)>) -> bool {
        let Some(c) = self.chans.get_mut(channel) else {
            return false;
        };
        let Known::At(p) = &c.known else {
            return false;
        };
        let old = p.epoch.clone();
        self.stats.missed += c.hold.len() as u64 + u64::from(c.behind.is_some());
        self.hold_bytes -= c
            .hold
            .values()
            .map(|h| h.body.len() + HELD_OVERHEAD)
            .sum::<usize>();
        c.hold.clear();
        c.behind = None;
        // Offsets of the old epoch are given out again in the new one.
        c.recent = [(0, 0); RECENT];
        let new = match &to {
            Known::At(p) => Some(p.epoch.clone()),
            _ => None,
        };
        c.known = to;
        self.gaps.push(channel.to_string());
        self.resets.push(Reset {
            channel: channel.to_string(),
            old,
            new,
            fork,
        });
        true
    }

    /// A read found history. Returns whether the channel is caught up with the top the
    /// read saw (else it reads on from where this one stopped).
    fn on_stream(
        &mut self,
        channel: &str,
        n: u64,
        s: Stream,
        was_admitted: bool,
        out: &mut Vec<BusEvent>,
    ) -> bool {
        let Some(c) = self.chans.get_mut(channel) else {
            return true;
        };
        match &c.known {
            Known::Unknown => {
                self.start_position(channel, n, s, was_admitted, out);
                return true;
            }
            // Redis holds another epoch: confirmed, a reset.
            Known::At(p) if p.epoch != s.epoch => match s.fork {
                Some(at) => self.fork(channel, at, s.epoch.clone()),
                None => self.begin_again(channel, Some(s.epoch.clone())),
            },
            Known::At(_) => {}
            Known::Empty => c.known = Known::At(StreamPosition::new(s.epoch.clone(), 0)),
        }
        self.adopt_claims(channel, n, &s.epoch);
        self.apply(channel, n, s, out)
    }

    /// The answer to a position read: the position starts at the top. Claims of that
    /// epoch at or below it were published before the members joined (dropped, or
    /// delivered if members were already admitted — a position read that had been
    /// refused before); those above it are held as any live message.
    fn start_position(
        &mut self,
        channel: &str,
        n: u64,
        s: Stream,
        was_admitted: bool,
        out: &mut Vec<BusEvent>,
    ) {
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        c.known = Known::At(StreamPosition::new(s.epoch.clone(), s.top));
        // Claims of this epoch at or below the top: published before the members joined
        // (dropped), or, if they were admitted already (an earlier position read was
        // refused), theirs (delivered in order, once).
        let mut mine: Vec<(u64, Bytes)> = Vec::new();
        let mut freed = 0;
        c.claims.retain(|(p, h)| {
            if p.epoch == s.epoch && p.offset <= s.top {
                freed += h.body.len() + HELD_OVERHEAD;
                mine.push((p.offset, h.body.clone()));
                return false;
            }
            true
        });
        self.hold_bytes -= freed;
        if was_admitted {
            mine.sort_by_key(|(o, _)| *o);
            mine.dedup_by_key(|(o, _)| *o);
            for (o, body) in mine {
                self.deliver(channel, Some(o), body, out);
            }
        }
        self.adopt_claims(channel, n, &s.epoch);
        self.settle_above_top(channel, n, s.top);
        self.release(channel, out);
    }

    /// Claims of the now confirmed epoch join the hold; claims of any other epoch that
    /// this read was to settle are dropped (forged, or of a history Redis no longer has).
    fn adopt_claims(&mut self, channel: &str, n: u64, epoch: &Epoch) {
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        let last = c.last();
        let mut freed = 0;
        for (p, h) in std::mem::take(&mut c.claims) {
            if p.epoch == *epoch {
                freed += h.body.len() + HELD_OVERHEAD;
                if p.offset > last && !c.hold.contains_key(&p.offset) {
                    freed -= h.body.len() + HELD_OVERHEAD;
                    c.hold.insert(p.offset, h);
                }
            } else if h.seen < n {
                freed += h.body.len() + HELD_OVERHEAD;
                self.stats.unconfirmed += 1;
            } else {
                c.claims.push((p, h));
            }
        }
        self.hold_bytes -= freed;
    }

    /// Entries of the confirmed epoch: delivered in order from `last + 1`; holes
    /// (history no longer has them) are counted missed, and a held message in a hole is
    /// delivered (its offset is within the top the read confirmed). History's entry,
    /// not a held copy, is what is delivered. Returns whether the read reached the top.
    fn apply(&mut self, channel: &str, n: u64, s: Stream, out: &mut Vec<BusEvent>) -> bool {
        let top = s.top;
        let covered = s.next.saturating_sub(1).min(top);
        for (o, body) in s.entries {
            let Some(c) = self.chans.get(channel) else {
                return true;
            };
            if o > top {
                continue;
            }
            if o <= c.last() {
                // Delivered live meanwhile; if what was delivered is not history's
                // entry, it was forged: history's is delivered too, and counted.
                let hash = self.hasher.hash_one(&body);
                if c.recent_hash(o).is_some_and(|h| h != hash && h != SETTLED) {
                    if let Some(c) = self.chans.get_mut(channel) {
                        c.record(o, SETTLED);
                    }
                    self.stats.conflicts += 1;
                    self.deliver(channel, Some(o), body, out);
                }
                continue;
            }
            self.fill_holes(channel, o - 1, out);
            let Some(c) = self.chans.get_mut(channel) else {
                return true;
            };
            match c.hold.remove(&o) {
                Some(h) => {
                    self.hold_bytes -= h.body.len() + HELD_OVERHEAD;
                    if h.body != body {
                        self.stats.conflicts += 1; // a forged copy arrived live
                    }
                }
                None => self.stats.repaired += 1,
            }
            c.set_last(o);
            c.record(o, self.hasher.hash_one(&body));
            self.deliver(channel, Some(o), body, out);
        }
        self.fill_holes(channel, covered, out);
        if covered < top {
            return false; // cut short by the read's bounds: read on from `next`
        }
        self.settle_above_top(channel, n, top);
        self.release(channel, out);
        true
    }

    /// Moves `last` up to `upto`: held messages on the way are delivered, the rest of
    /// the offsets counted missed.
    fn fill_holes(&mut self, channel: &str, upto: u64, out: &mut Vec<BusEvent>) {
        loop {
            let Some(c) = self.chans.get_mut(channel) else {
                return;
            };
            let last = c.last();
            if upto <= last {
                return;
            }
            match c.hold.first_key_value().map(|(o, _)| *o) {
                Some(o) if o <= upto => {
                    let h = c.hold.remove(&o).map(|h| h.body).unwrap_or_default();
                    self.hold_bytes -= h.len() + HELD_OVERHEAD;
                    if o > last + 1 {
                        self.stats.missed += o - last - 1;
                        self.gaps.push(channel.to_string());
                    }
                    c.set_last(o);
                    c.record(o, self.hasher.hash_one(&h));
                    self.deliver(channel, Some(o), h, out);
                }
                _ => {
                    self.stats.missed += upto - last;
                    self.gaps.push(channel.to_string());
                    c.set_last(upto);
                    return;
                }
            }
        }
    }

    /// After a read reached `top`: held messages above it that arrived before the read
    /// was sent are forged (a real one would be within the top): dropped, counted.
    fn settle_above_top(&mut self, channel: &str, n: u64, top: u64) {
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        let dropped = drop_settled_hold(c, n, top);
        self.stats.unconfirmed += dropped.0;
        self.hold_bytes -= dropped.1;
        match c.behind {
            Some((b, _)) if b <= c.last() => c.behind = None,
            Some((b, seen)) if b > top && seen < n => {
                c.behind = None;
                self.stats.unconfirmed += 1;
            }
            _ => {}
        }
    }

    /// Delivers held messages that are next in line.
    fn release(&mut self, channel: &str, out: &mut Vec<BusEvent>) {
        loop {
            let Some(c) = self.chans.get_mut(channel) else {
                return;
            };
            let next = c.last() + 1;
            if !matches!(c.known, Known::At(_)) {
                return;
            }
            let Some(h) = c.hold.remove(&next) else {
                if c.behind.is_some_and(|(b, _)| b <= c.last()) {
                    c.behind = None;
                }
                return;
            };
            self.hold_bytes -= h.body.len() + HELD_OVERHEAD;
            c.set_last(next);
            c.record(next, self.hasher.hash_one(&h.body));
            self.deliver(channel, Some(next), h.body, out);
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

    /// Delivers `body`; `offset` (in the channel's confirmed epoch) is the position the
    /// delivery carries (`None`: a message without one, from a foreign publisher).
    fn deliver(
        &mut self,
        channel: &str,
        offset: Option<u64>,
        body: Bytes,
        out: &mut Vec<BusEvent>,
    ) {
        let (kind, payload) = envelope::decode(body);
        if payload.len() > self.max_payload {
            self.stats.oversize += 1;
            return;
        }
        let pos = match (offset, self.chans.get(channel).map(|c| &c.known)) {
            (Some(o), Some(Known::At(p))) => Some(StreamPosition::new(p.epoch.clone(), o)),
            _ => None,
        };
        out.push(BusEvent::Deliver {
            channel: channel.to_string(),
            kind,
            payload,
            pos,
        });
    }
}

/// Drops claims that arrived before read `n` was sent, unless `keep` says otherwise.
/// Returns (how many, bytes).
fn drop_settled_claims(
    c: &mut Chan,
    n: u64,
    keep: impl Fn(&StreamPosition) -> bool,
) -> (u64, usize) {
    let mut dropped = (0, 0);
    c.claims.retain(|(p, h)| {
        if h.seen < n && !keep(p) {
            dropped.0 += 1;
            dropped.1 += h.body.len() + HELD_OVERHEAD;
            return false;
        }
        true
    });
    dropped
}

/// Drops held messages above `top` that arrived before read `n` was sent.
fn drop_settled_hold(c: &mut Chan, n: u64, top: u64) -> (u64, usize) {
    let gone: Vec<u64> = c
        .hold
        .iter()
        .filter(|(o, h)| **o > top && h.seen < n)
        .map(|(o, _)| *o)
        .collect();
    let mut dropped = (0, 0);
    for o in gone {
        if let Some(h) = c.hold.remove(&o) {
            dropped.0 += 1;
            dropped.1 += h.body.len() + HELD_OVERHEAD;
        }
    }
    dropped
}

#[cfg(test)]
#[path = "positions_tests.rs"]
mod tests;
