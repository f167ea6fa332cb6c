//! Picks the backplane the configuration asks for, and the in-memory one.
//!
//! [`LocalBus`] is the whole standalone backplane and the shortest example of the
//! [`Backplane`] trait: publishes loop straight back as deliveries, in order, and every
//! channel is always subscribed. It keeps each channel's history in memory
//! ([`MemHistory`]), as the Redis backplane keeps it in Redis.

use crate::backplane::{Backplane, BusEvent, BusStats};
use crate::config::Config;
use crate::hub::Interest;
use crate::mem_history::MemHistory;
use crate::redis_link::{health::Timing, RedisLink, Settings};
use crate::ws::Kind;
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often quiet channels' history is checked for expiry.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// The backplane of this process.
pub type Bus = Box<dyn Backplane>;

/// Redis with `--redis`, in memory without.
pub fn from_config(cfg: &Config) -> Bus {
    match &cfg.redis {
        Some(target) => Box::new(RedisLink::new(Settings {
            target: target.clone(),
            prefix: cfg.channel_prefix.clone(),
            buffer_messages: cfg.redis_buffer_messages,
            buffer_bytes: cfg.redis_buffer_bytes,
            max_payload: cfg.max_message_size,
            history_size: cfg.history_size,
            history_ttl: cfg.history_ttl,
            hold_bytes: cfg.history_hold_bytes,
            timing: Timing {
                ping_interval: cfg.redis_ping_interval,
                timeout: cfg.redis_timeout,
                backoff_max: cfg.redis_backoff_max,
            },
        })),
        None => Box::new(LocalBus::new(MemHistory::new(
            cfg.history_size,
            cfg.history_ttl,
            cfg.history_memory_bytes,
        ))),
    }
}

/// Standalone: publishes loop straight back as deliveries, in order.
#[derive(Debug)]
pub struct LocalBus {
    queue: VecDeque<BusEvent>,
    published: u64,
    history: MemHistory,
    next_expiry: Instant,
}

impl LocalBus {
    pub fn new(history: MemHistory) -> LocalBus {
        LocalBus {
            queue: VecDeque::new(),
            published: 0,
            history,
            next_expiry: Instant::now() + EXPIRE_EVERY,
        }
    }

    pub fn history(&self) -> &MemHistory {
        &self.history
    }
}

impl Backplane for LocalBus {
    fn describe(&self) -> String {
        "standalone (no Redis)".to_string()
    }

    fn interest(&mut self, _: Interest) {}

    fn is_subscribed(&self, _: &str) -> bool {
        true
    }

    fn publish(&mut self, channel: &str, kind: Kind, payload: Bytes) {
        self.published += 1;
        self.history
            .append(channel, kind, payload.clone(), Instant::now());
        self.queue.push_back(BusEvent::Deliver {
            channel: channel.to_string(),
            kind,
            payload,
        });
    }

    fn is_full(&self, _: usize) -> bool {
        false
    }

    fn drain(&mut self, out: &mut Vec<BusEvent>) {
        out.extend(self.queue.drain(..));
    }

    fn ready(&self, _: Instant) -> Result<(), &'static str> {
        Ok(())
    }

    fn tick(&mut self, _: &mio::Registry, now: Instant) {
        if now >= self.next_expiry {
            self.history.expire(now);
            self.next_expiry = now + EXPIRE_EVERY;
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        Some(self.next_expiry)
    }

    fn pending(&self) -> usize {
        self.queue.len()
    }

    fn stats(&self, _: Instant) -> BusStats {
        BusStats {
            up: true,
            published: self.published,
            history_bytes: self.history.bytes(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_bus_delivers_every_publish_in_order() {
        let mut b = LocalBus::new(MemHistory::new(10, Duration::from_secs(60), 1 << 20));
        assert!(b.is_subscribed("any") && b.ready(Instant::now()).is_ok());
        for i in 0..3 {
            b.publish("c", Kind::Text, Bytes::from(format!("{i}")));
        }
        assert_eq!(b.pending(), 3);
        let mut out = Vec::new();
        b.drain(&mut out);
        let got: Vec<_> = out
            .iter()
            .map(|e| match e {
                BusEvent::Deliver { payload, .. } => payload.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, ["0", "1", "2"]);
        assert_eq!(
            b.history().top("c").map(|t| t.1),
            Some(3),
            "kept in history"
        );
        assert_eq!(b.stats(Instant::now()).published, 3);
    }
}
