//! Picks the backplane the configuration asks for, and the in-memory one.
//!
//! [`LocalBus`] is the whole standalone backplane and the shortest example of the
//! [`Backplane`] trait: publishes loop straight back as deliveries, in order, and every
//! channel is always subscribed.

use crate::backplane::{Backplane, BusEvent, BusStats};
use crate::config::Config;
use crate::hub::Interest;
use crate::redis_link::{health::Timing, RedisLink, Settings};
use crate::ws::Kind;
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Instant;

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
            timing: Timing {
                ping_interval: cfg.redis_ping_interval,
                timeout: cfg.redis_timeout,
                backoff_max: cfg.redis_backoff_max,
            },
        })),
        None => Box::<LocalBus>::default(),
    }
}

/// Standalone: publishes loop straight back as deliveries, in order.
#[derive(Debug, Default)]
pub struct LocalBus {
    queue: VecDeque<BusEvent>,
    published: u64,
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

    fn pending(&self) -> usize {
        self.queue.len()
    }

    fn stats(&self, _: Instant) -> BusStats {
        BusStats {
            up: true,
            published: self.published,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_bus_delivers_every_publish_in_order() {
        let mut b = LocalBus::default();
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
        assert_eq!(b.stats(Instant::now()).published, 3);
    }
}
