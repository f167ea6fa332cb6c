//! The in-memory backplane: [`LocalBus`] is the whole standalone backplane and the shortest example of the
//! [`Backplane`] trait: publishes loop straight back as deliveries, in order, and every
//! channel is always subscribed. It keeps each channel's history in memory
//! ([`MemHistory`]), as the Redis backplane keeps it in Redis.

use crate::backplane::{Backplane, BusEvent, BusStats};
use crate::hub::Interest;
pub mod history;

use crate::backplane::{Publication, Recovery};
use crate::message::StreamPosition;
use crate::ws::Kind;
use bytes::Bytes;
use history::{MemHistory, Since};
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
            pos: self.history.position(channel),
        });
    }

    fn is_full(&self, _: usize) -> bool {
        false
    }

    /// Answered at once from the history in memory.
    fn history(&mut self, id: u64, channel: &str, since: Option<StreamPosition>, limit: usize) {
        let top = match since {
            None => self.history.begin(channel, Instant::now()),
            Some(_) => self.history.position(channel),
        };
        let answer = match since {
            None => Recovery::Complete {
                publications: Vec::new().into(),
                top,
            },
            Some(p) => match self.history.since(channel, p.epoch.as_bytes(), p.offset) {
                Since::Messages(m) if m.len() <= limit => match &top {
                    Some(t) => Recovery::Complete {
                        publications: m
                            .into_iter()
                            .map(|(offset, kind, payload)| Publication {
                                pos: StreamPosition::new(t.epoch.clone(), offset),
                                kind,
                                payload,
                            })
                            .collect(),
                        top,
                    },
                    None => Recovery::Lost { top: None },
                },
                _ => Recovery::Lost { top },
            },
        };
        self.queue.push_back(BusEvent::History {
            id,
            channel: channel.to_string(),
            answer,
        });
    }

    fn history_window(
        &mut self,
        id: u64,
        channel: &str,
        after: StreamPosition,
        limit: usize,
        skip_trimmed: bool,
    ) {
        let top = self.history.position(channel);
        let trimmed = !skip_trimmed
            && self
                .history
                .since(channel, after.epoch.as_bytes(), after.offset)
                == Since::Lost;
        let answer = match &top {
            Some(t) if t.epoch == after.epoch && !trimmed => {
                let m = self.history.window(channel, after.offset, limit);
                Recovery::Complete {
                    publications: m
                        .into_iter()
                        .map(|(offset, kind, payload)| Publication {
                            pos: StreamPosition::new(t.epoch.clone(), offset),
                            kind,
                            payload,
                        })
                        .collect(),
                    top: top.clone(),
                }
            }
            _ => Recovery::Lost { top },
        };
        self.queue.push_back(BusEvent::History {
            id,
            channel: channel.to_string(),
            answer,
        });
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
                BusEvent::Deliver { payload, pos, .. } => {
                    (payload.clone(), pos.as_ref().map(|p| p.offset))
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                ("0".into(), Some(1)),
                ("1".into(), Some(2)),
                ("2".into(), Some(3))
            ],
            "each delivery carries its place in history"
        );
        assert_eq!(
            b.history().top("c").map(|t| t.1),
            Some(3),
            "kept in history"
        );
        assert_eq!(b.stats(Instant::now()).published, 3);
    }

    #[test]
    fn history_answers_what_followed_a_position_or_says_it_is_lost() {
        let mut b = LocalBus::new(MemHistory::new(3, Duration::from_secs(60), 1 << 20));
        for i in 1..=5 {
            b.publish("c", Kind::Text, Bytes::from(format!("m{i}")));
        }
        let mut out = Vec::new();
        b.drain(&mut out);
        let top = b.history().position("c").expect("top");
        let at = |o| Some(StreamPosition::new(top.epoch.clone(), o));
        let ask = |b: &mut LocalBus, since, limit| {
            b.history(7, "c", since, limit);
            let mut out = Vec::new();
            b.drain(&mut out);
            match out.pop() {
                Some(BusEvent::History { id: 7, answer, .. }) => answer,
                other => panic!("{other:?}"),
            }
        };
        match ask(&mut b, at(3), 10) {
            Recovery::Complete {
                publications,
                top: t,
            } => {
                let got: Vec<_> = publications
                    .iter()
                    .map(|p| (p.pos.offset, p.payload.clone()))
                    .collect();
                assert_eq!(got, [(4, Bytes::from("m4")), (5, Bytes::from("m5"))]);
                assert_eq!(t, Some(top.clone()));
            }
            other => panic!("{other:?}"),
        }
        // Trimmed (history keeps 3: 3..=5), another epoch, over the limit: lost.
        assert_eq!(
            ask(&mut b, at(1), 10),
            Recovery::Lost {
                top: Some(top.clone())
            }
        );
        let other = Some(StreamPosition::new(
            crate::message::Epoch::from_static("zz"),
            4,
        ));
        assert_eq!(
            ask(&mut b, other, 10),
            Recovery::Lost {
                top: Some(top.clone())
            }
        );
        assert_eq!(
            ask(&mut b, at(2), 2),
            Recovery::Lost {
                top: Some(top.clone())
            }
        );
        assert!(matches!(
            ask(&mut b, None, 10),
            Recovery::Complete { top: Some(_), .. }
        ));
        assert!(
            matches!(ask(&mut b, at(5), 10), Recovery::Complete { publications, .. } if publications.is_empty())
        );
    }
}
