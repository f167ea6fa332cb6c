//! The in-memory backplane: [`LocalBus`] is the whole standalone backplane and the shortest example of the
//! [`Backplane`] trait: publishes loop straight back as deliveries, in order, and every
//! channel is always subscribed. It keeps each channel's history in memory
//! ([`MemHistory`]), as the Redis backplane keeps it in Redis.

use crate::backplane::{Backplane, BusEvent, BusStats};
use crate::hub::Interest;
pub mod history;

use crate::ws::Kind;
use bytes::Bytes;
use history::MemHistory;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often quiet channels' history is checked for expiry.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

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
