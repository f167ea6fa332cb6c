//! The seam between the loop and "everyone else on this channel": the [`Backplane`]
//! trait, what a backplane tells the loop ([`BusEvent`]) and what it counts
//! ([`BusStats`]). A leaf: the loop and every backplane import it, it imports neither.
//!
//! A backplane is a sans-IO core plus a thin I/O shell. The loop owns the poll and the
//! clock: it hands the backplane interest changes (first member joined / last left),
//! publishes, readiness events for the backplane's own tokens (`token::BACKPLANE_*`) and
//! `now`; once per iteration it calls [`Backplane::tick`] (timers, writes) and drains
//! [`BusEvent`]s (deliveries, confirmed subscriptions). [`memory::LocalBus`] (standalone,
//! in memory) is the shortest complete example; [`redis::RedisLink`] the real one;
//! [`pick::from_config`] chooses. This file imports neither (`tests/structure.rs`).

pub mod memory;
pub mod pick;
pub mod redis;

use crate::hub::Interest;
use crate::message::StreamPosition;
use crate::ws::Kind;
use bytes::Bytes;
use mio::{event::Event, Registry};
use std::time::Instant;

/// Something the backplane tells the loop.
#[derive(Debug, PartialEq, Eq)]
pub enum BusEvent {
    /// Deliver this message to the local members of `channel`.
    Deliver {
        channel: String,
        kind: Kind,
        payload: Bytes,
        /// Its place in the channel's history, as the backplane confirmed it (`None`:
        /// history off, or a foreign publisher's message without one). A client
        /// protocol tells its clients this position, so they can recover from it.
        pos: Option<StreamPosition>,
    },
    /// `channel` is now subscribed: held upgrades for it may complete.
    Subscribed(String),
    /// What was delivered on `channel` has a hole (a reset, or messages history no
    /// longer held — counted in the stats): a client told positions must start over
    /// (Centrifugo: resubscribe, and learn it was not recovered).
    Gap(String),
    /// The answer to [`Backplane::history`] number `id`.
    History {
        id: u64,
        channel: String,
        answer: Recovery,
    },
}

/// A message from history: its place, kind and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub pos: StreamPosition,
    pub kind: Kind,
    pub payload: Bytes,
}

/// What [`Backplane::history`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Everything published after the position asked for, in order and without a hole,
    /// up to `top`, the channel's position when the answer was read (`None`: the
    /// channel has no history). Shared by every asker of one read.
    Complete {
        publications: std::sync::Arc<[Publication]>,
        top: Option<StreamPosition>,
    },
    /// History cannot bring the asker up to date: another epoch, trimmed, expired, or
    /// more than the limit asked for. `top`: where the channel is now, if anywhere.
    Lost { top: Option<StreamPosition> },
    /// Not readable now (Redis refused the read, or it is reconnecting): ask again.
    Failed,
}

/// Why a backplane refused a publish for good, as `BusStats::publish_refused` counts
/// them (the metrics label).
pub const REFUSED_REASONS: [&str; 4] = ["wrongtype", "noperm", "badmeta", "other"];

/// Counters the metrics page shows.
#[derive(Debug, Default, Clone, Copy)]
pub struct BusStats {
    pub up: bool,
    pub reconnects: u64,
    pub buffered_messages: usize,
    pub buffered_bytes: usize,
    pub dropped: u64,
    /// Messages from the backplane larger than `--max-message-size`, not delivered.
    pub oversize: u64,
    pub published: u64,
    /// Publishes dropped after being sent `MAX_PUBLISH_SENDS` times without a reply.
    pub publish_abandoned: u64,
    /// Connect attempts that failed before the link came up.
    pub connect_failures: u64,
    /// Publishes refused for good, by reason (`REFUSED_REASONS`).
    pub publish_refused: [u64; 4],
    /// History and gap repair (Redis with history on).
    pub history: HistoryStats,
    /// Bytes of live messages held while gaps are read.
    pub held_bytes: usize,
    /// Standalone: bytes of history kept in memory.
    pub history_bytes: usize,
}

/// What history and gap repair count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HistoryStats {
    /// Channels whose history began again with another epoch.
    pub resets: u64,
    /// Messages delivered from history reads that had not arrived live (gaps filled).
    pub repaired: u64,
    /// Messages history no longer held when a gap was read: lost, and counted.
    pub missed: u64,
    /// Messages dropped because their offset was already delivered.
    pub duplicates: u64,
    /// History reads sent.
    pub reads: u64,
    /// Live messages not held because the hold limit was reached (read later).
    pub hold_overflows: u64,
    /// Messages larger than `--max-message-size` (not delivered).
    pub oversize: u64,
    /// Live messages whose claimed position history did not confirm (a forged
    /// envelope, or one of a history Redis no longer has): dropped, never delivered.
    pub unconfirmed: u64,
    /// History reads Redis refused (or answered with nonsense) for one channel.
    pub read_refused: u64,
    /// Held live copies that differed from history's entry at their offset (history's
    /// was delivered): a forged claim of an offset before the real message arrived.
    pub conflicts: u64,
    /// Dedupe values beyond anything the instance sent, overwritten (not "applied").
    pub corrupt_dedupe: u64,
    /// Meta hashes wsfan did not write (bad epoch or top), replaced by a new epoch.
    pub corrupt_meta: u64,
    /// With `--history-key`: positioned envelopes without a valid tag, never delivered.
    pub forged: u64,
    /// Channels whose history forked: another Redis took over that may lack the old
    /// one's tail (a promoted replica, a restart); delivery went on in the new epoch.
    pub forks: u64,
    /// Messages this instance delivered from a tail the new Redis does not have: what
    /// the old one took with it, as far as this instance saw.
    pub fork_lost: u64,
}

/// What the loop needs from a backplane. Every method returns at once: no blocking
/// call, no sleeping; I/O only on the backplane's own non-blocking sockets.
pub trait Backplane {
    /// For the start-up log line (`standalone`, `redis redis://…`).
    fn describe(&self) -> String;
    /// The first local member of a channel joined, or the last left.
    fn interest(&mut self, i: Interest);
    /// Whether a message published now on `channel` will reach this instance.
    fn is_subscribed(&self, channel: &str) -> bool;
    /// Sends, or queues for sending. A backplane that has to drop something to stay
    /// within its limits counts it in its stats (and logs it, rate-limited).
    fn publish(&mut self, channel: &str, kind: Kind, payload: Bytes);
    /// Whether a publish now would have to drop a buffered message (publish API → 503).
    fn is_full(&self, bytes: usize) -> bool;
    /// Asks what `channel` published after `since`, at most `limit` publications
    /// (`since: None`: only where the channel is now). The answer comes as a
    /// [`BusEvent::History`] carrying `id`, in this iteration or a later one; asks for
    /// the same channel and position at the same time share one read.
    fn history(&mut self, id: u64, channel: &str, since: Option<StreamPosition>, limit: usize);
    /// Like [`Backplane::history`] from `after`, but for browsing rather than
    /// recovering: the oldest `limit` publications after it (more are no `Lost`). With
    /// `skip_trimmed`, a start history no longer holds is skipped too (then `Lost` only
    /// for another epoch).
    fn history_window(
        &mut self,
        id: u64,
        channel: &str,
        after: StreamPosition,
        limit: usize,
        skip_trimmed: bool,
    );
    /// How many bytes of client input the loop may read now without the publishes in
    /// them overflowing the backplane's buffer (`None`: no limit — standalone, or an
    /// outage, where the buffer's drop-oldest rule applies). Below one frame's worth the
    /// loop stops reading clients until [`Backplane::backlogged`] clears, so TCP slows
    /// the publishers down instead of the buffer dropping their messages.
    fn intake_room(&self) -> Option<usize> {
        None
    }
    /// Still working through a backlog (reads stay paused until this is false).
    fn backlogged(&self) -> bool {
        false
    }
    /// Moves pending events into `out`.
    fn drain(&mut self, out: &mut Vec<BusEvent>);
    /// `Ok` while a publish and a subscribe would work now; otherwise why not (for
    /// `/readyz` and systemd's `READY=1`).
    fn ready(&self, now: Instant) -> Result<(), &'static str>;
    /// A readiness event for one of the backplane's tokens.
    fn on_event(&mut self, _registry: &Registry, _ev: &Event, _now: Instant) {}
    /// Goes on reading input a previous read left for this iteration (read budget).
    fn resume_reads(&mut self, _registry: &Registry, _now: Instant) {}
    /// Input is waiting to be read without a new readiness event: poll without sleeping.
    fn has_more_to_read(&self) -> bool {
        false
    }
    /// Timers (reconnects, PING deadlines) and writing what was queued this iteration.
    fn tick(&mut self, _registry: &Registry, _now: Instant) {}
    /// When `tick` next has something to do.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
    /// Unsent publishes (shutdown waits for them).
    fn pending(&self) -> usize;
    fn stats(&self, now: Instant) -> BusStats;
}
