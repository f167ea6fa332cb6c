//! The backplane between the loop and "everyone else on this channel".
//!
//! Standalone, it is an in-memory queue; with `--redis`, it is [`RedisLink`]. Both take
//! the same inputs (interest changes from the hub, publishes from clients) and give the
//! same outputs ([`BusEvent`]s), so the loop never knows which one it talks to, and a
//! later backplane (Redis Streams with offsets, sharded Pub/Sub) slots in here.

use crate::hub::Interest;
use crate::redis_link::RedisLink;
use crate::ws::Kind;
use bytes::Bytes;
use mio::{event::Event, Registry};
use std::collections::VecDeque;
use std::time::Instant;

/// Something the backplane tells the loop.
#[derive(Debug, PartialEq, Eq)]
pub enum BusEvent {
    /// Deliver this message to the local members of `channel`.
    Deliver {
        channel: String,
        kind: Kind,
        payload: Bytes,
    },
    /// `channel` is now subscribed: held upgrades for it may complete.
    Subscribed(String),
}

/// Outcome of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Sent, or queued for sending.
    Accepted,
    /// Queued, but the outage buffer was full and its oldest message was dropped.
    AcceptedDroppedOldest,
}

/// Counters the metrics page shows.
#[derive(Debug, Default, Clone, Copy)]
pub struct BusStats {
    pub up: bool,
    pub reconnects: u64,
    pub buffered_messages: usize,
    pub buffered_bytes: usize,
    pub dropped: u64,
    /// Messages from Redis larger than `--max-message-size`, not delivered.
    pub oversize: u64,
    pub published: u64,
    /// Publishes dropped after `redis_link::MAX_PUBLISH_SENDS` sends without a reply.
    pub publish_abandoned: u64,
    /// Redis connect attempts that failed before the link came up.
    pub connect_failures: u64,
}

/// Standalone: publishes loop straight back as deliveries, in order.
#[derive(Debug, Default)]
pub struct LocalBus {
    queue: VecDeque<BusEvent>,
    published: u64,
}

pub enum Bus {
    Local(LocalBus),
    Redis(Box<RedisLink>),
}

impl Bus {
    pub fn interest(&mut self, i: Interest) {
        if let Bus::Redis(r) = self {
            r.interest(i);
        }
    }

    /// Whether a message published now on `channel` will reach this instance.
    pub fn is_subscribed(&self, channel: &str) -> bool {
        match self {
            Bus::Local(_) => true,
            Bus::Redis(r) => r.is_subscribed(channel),
        }
    }

    pub fn publish(&mut self, channel: &str, kind: Kind, payload: Bytes) -> Published {
        match self {
            Bus::Local(l) => {
                l.published += 1;
                l.queue.push_back(BusEvent::Deliver {
                    channel: channel.to_string(),
                    kind,
                    payload,
                });
                Published::Accepted
            }
            Bus::Redis(r) => r.publish(channel, kind, payload),
        }
    }

    /// Whether a publish now would have to drop a buffered message (publish API → 503).
    pub fn is_full(&self, bytes: usize) -> bool {
        match self {
            Bus::Local(_) => false,
            Bus::Redis(r) => r.is_full(bytes),
        }
    }

    /// Moves pending events into `out`.
    pub fn drain(&mut self, out: &mut Vec<BusEvent>) {
        match self {
            Bus::Local(l) => out.extend(l.queue.drain(..)),
            Bus::Redis(r) => r.drain(out),
        }
    }

    /// `Ok` while a publish and a subscribe would work now; otherwise why not (for
    /// `/readyz` and systemd's `READY=1`).
    pub fn ready(&self, now: Instant) -> Result<(), &'static str> {
        match self {
            Bus::Local(_) => Ok(()),
            Bus::Redis(r) => r.ready(now),
        }
    }

    pub fn on_event(&mut self, registry: &Registry, ev: &Event, now: Instant) {
        if let Bus::Redis(r) = self {
            r.on_event(registry, ev, now);
        }
    }

    /// Goes on reading input a previous read left for this iteration (read budget).
    pub fn resume_reads(&mut self, registry: &Registry, now: Instant) {
        if let Bus::Redis(r) = self {
            r.resume_reads(registry, now);
        }
    }

    /// Input is waiting to be read without a new readiness event: poll without sleeping.
    pub fn has_more_to_read(&self) -> bool {
        matches!(self, Bus::Redis(r) if r.has_more_to_read())
    }

    /// Timers (reconnect, PING deadlines) and writing what was queued this iteration.
    pub fn tick(&mut self, registry: &Registry, now: Instant) {
        if let Bus::Redis(r) = self {
            r.tick(registry, now);
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        match self {
            Bus::Local(_) => None,
            Bus::Redis(r) => r.next_deadline(),
        }
    }

    /// Unsent publishes (shutdown waits for them).
    pub fn pending(&self) -> usize {
        match self {
            Bus::Local(l) => l.queue.len(),
            Bus::Redis(r) => r.stats(Instant::now()).buffered_messages,
        }
    }

    pub fn stats(&self, now: Instant) -> BusStats {
        match self {
            Bus::Local(l) => BusStats {
                up: true,
                published: l.published,
                ..Default::default()
            },
            Bus::Redis(r) => r.stats(now),
        }
    }
}
