//! Answers to `Backplane::history` ("what did this channel publish after position P"),
//! sans-IO: asks for one channel and position at the same time share one read; a read
//! cut short by its byte budget reads on; the answer is complete (no hole, same epoch,
//! within the limit) or lost. Inputs are asks, read replies and the publish link going
//! down; outputs are the reads to send and `BusEvent::History` answers. No sockets, no
//! clock.
//!
//! Unlike gap repair (`positions`), nothing here is a claim: every publication comes
//! from the stream, with the position the stream gives it.

use super::positions::{Range, Stream};
use crate::backplane::{BusEvent, Publication, Recovery};
use crate::envelope;
use crate::message::StreamPosition;
use std::collections::{HashMap, VecDeque};

/// What a shared read is for: a channel, the position after which to read (`None`:
/// only the top), and how (`Mode`).
pub type Key = (Box<str>, Option<StreamPosition>, Mode);

/// How a read's answer is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// A recovery: everything after the position, or `Lost` (trimmed, over the limit).
    Recover,
    /// A window (`Backplane::history_window`): the oldest `limit` after the position;
    /// `skip_trimmed`: a start history no longer holds is skipped instead of `Lost`.
    Window { skip_trimmed: bool },
}

/// A read to send on the publish link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverReq {
    pub key: Key,
    /// First offset this read asks for (0: the top only).
    pub from: u64,
    /// Matches the reply to the read (a key answered and asked again has a new one).
    pub serial: u64,
}

impl RecoverReq {
    /// The read script's `(epoch, first offset)` arguments.
    pub fn script_args(&self) -> (&[u8], u64) {
        match &self.key.1 {
            Some(p) => (p.epoch.as_bytes(), self.from),
            None => (b"", 0),
        }
    }
}

#[derive(Debug)]
struct Pending {
    /// Askers and the limit each asked for.
    asks: Vec<(u64, usize)>,
    got: Vec<Publication>,
    bytes: usize,
    /// Next offset to read.
    from: u64,
    /// `Some(serial)` while a read is in flight.
    in_flight: Option<u64>,
}

/// Every history ask not yet answered.
#[derive(Debug)]
pub struct Recoveries {
    pending: HashMap<Key, Pending>,
    to_send: VecDeque<Key>,
    serial: u64,
    /// Payload bytes one answer may gather (beyond it: lost, the asker starts over).
    max_bytes: usize,
    /// Payloads larger than this are not delivered (`--max-message-size`).
    max_payload: usize,
}

impl Recoveries {
    pub fn new(max_bytes: usize, max_payload: usize) -> Recoveries {
        Recoveries {
            pending: HashMap::new(),
            to_send: VecDeque::new(),
            serial: 0,
            max_bytes,
            max_payload,
        }
    }

    /// Asks not yet answered.
    pub fn len(&self) -> usize {
        self.pending.values().map(|p| p.asks.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// A new ask: joins a read of the same channel and position if one is under way.
    pub fn ask(&mut self, id: u64, channel: &str, since: Option<StreamPosition>, limit: usize) {
        self.ask_key(id, (channel.into(), since, Mode::Recover), limit);
    }

    /// An ask for the oldest `limit` publications after `after`.
    pub fn ask_window(
        &mut self,
        id: u64,
        channel: &str,
        after: StreamPosition,
        limit: usize,
        skip_trimmed: bool,
    ) {
        let key = (channel.into(), Some(after), Mode::Window { skip_trimmed });
        self.ask_key(id, key, limit);
    }

    fn ask_key(&mut self, id: u64, key: Key, limit: usize) {
        let from = key.1.as_ref().map_or(0, |p| p.offset + 1);
        match self.pending.get_mut(&key) {
            Some(p) => p.asks.push((id, limit)),
            None => {
                self.pending.insert(
                    key.clone(),
                    Pending {
                        asks: vec![(id, limit)],
                        got: Vec::new(),
                        bytes: 0,
                        from,
                        in_flight: None,
                    },
                );
                self.to_send.push_back(key);
            }
        }
    }

    /// The next read to send, if any (marked in flight).
    pub fn next_read(&mut self) -> Option<RecoverReq> {
        while let Some(key) = self.to_send.pop_front() {
            let Some(p) = self.pending.get_mut(&key) else {
                continue;
            };
            if p.in_flight.is_some() {
                continue;
            }
            self.serial += 1;
            p.in_flight = Some(self.serial);
            return Some(RecoverReq {
                from: p.from,
                key,
                serial: self.serial,
            });
        }
        None
    }

    /// The publish link went down: reads in flight get no reply; they are sent again.
    pub fn on_down(&mut self) {
        let mut again: Vec<Key> = Vec::new();
        for (k, p) in &mut self.pending {
            if p.in_flight.take().is_some() {
                again.push(k.clone());
            }
        }
        again.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.cmp(&b.2)));
        self.to_send.extend(again);
    }

    /// A read's reply (`Err`: Redis refused it for this channel).
    pub fn on_range(&mut self, req: &RecoverReq, r: Result<Range, ()>, out: &mut Vec<BusEvent>) {
        let Some(p) = self.pending.get_mut(&req.key) else {
            return;
        };
        if p.in_flight != Some(req.serial) {
            return;
        }
        p.in_flight = None;
        let since = &req.key.1;
        let answer = match (r, since) {
            (Err(()), _) => Recovery::Failed,
            (Ok(Range::None), None) => Recovery::Complete {
                publications: Vec::new().into(),
                top: None,
            },
            (Ok(Range::None), Some(_)) => Recovery::Lost { top: None },
            (Ok(Range::At(s)), None) => Recovery::Complete {
                publications: Vec::new().into(),
                top: Some(StreamPosition::new(s.epoch, s.top)),
            },
            (Ok(Range::At(s)), Some(at)) => match self.gather(&req.key, at, s) {
                Some(answer) => answer,
                None => {
                    // Cut short by the read's budget: read on.
                    self.to_send.push_back(req.key.clone());
                    return;
                }
            },
        };
        self.answer(&req.key, answer, out);
    }

    /// Adds a read's entries; `None` while more is to read.
    fn gather(&mut self, key: &Key, at: &StreamPosition, s: Stream) -> Option<Recovery> {
        let top = Some(StreamPosition::new(s.epoch.clone(), s.top));
        let max_bytes = self.max_bytes;
        let max_payload = self.max_payload;
        let window = key.2 != Mode::Recover;
        let lenient = key.2 == Mode::Window { skip_trimmed: true };
        let p = self.pending.get_mut(key)?;
        let limit = p.asks.iter().map(|a| a.1).max().unwrap_or(0);
        if s.epoch != at.epoch || at.offset > s.top {
            return Some(Recovery::Lost { top });
        }
        for (o, body) in s.entries {
            if lenient && p.got.is_empty() && o > p.from {
                p.from = o; // a trimmed start: what history holds begins here
            }
            if o != p.from {
                // Trimmed, expired, or an entry too large for this instance: a hole.
                return Some(Recovery::Lost { top });
            }
            let (kind, payload) = envelope::decode(body);
            if payload.len() > max_payload {
                return Some(Recovery::Lost { top });
            }
            p.bytes += payload.len();
            p.got.push(Publication {
                pos: StreamPosition::new(s.epoch.clone(), o),
                kind,
                payload,
            });
            p.from = o + 1;
            if window && p.got.len() >= limit {
                // A window is full: the oldest `limit` are the answer.
                return Some(Recovery::Complete {
                    publications: std::mem::take(&mut p.got).into(),
                    top,
                });
            }
            if p.got.len() > limit || p.bytes > max_bytes {
                return Some(Recovery::Lost { top });
            }
        }
        let covered = s.next.saturating_sub(1).min(s.top);
        if lenient && p.got.is_empty() && p.from <= covered {
            p.from = covered + 1; // nothing held there
        }
        if p.from <= covered {
            return Some(Recovery::Lost { top }); // looked past entries it did not return
        }
        if covered >= s.top {
            return Some(Recovery::Complete {
                publications: std::mem::take(&mut p.got).into(),
                top,
            });
        }
        None
    }

    /// Every asker of `key` gets its answer (one shared list of publications; an asker
    /// whose own limit is smaller than what was read gets `Lost`).
    fn answer(&mut self, key: &Key, answer: Recovery, out: &mut Vec<BusEvent>) {
        let Some(p) = self.pending.remove(key) else {
            return;
        };
        for (id, limit) in p.asks {
            let a = match &answer {
                // A window asker with a smaller limit gets the oldest it asked for.
                Recovery::Complete { publications, top }
                    if key.2 != Mode::Recover && publications.len() > limit =>
                {
                    Recovery::Complete {
                        publications: publications[..limit].into(),
                        top: top.clone(),
                    }
                }
                Recovery::Complete { publications, top } if publications.len() > limit => {
                    Recovery::Lost { top: top.clone() }
                }
                other => other.clone(),
            };
            out.push(BusEvent::History {
                id,
                channel: key.0.to_string(),
                answer: a,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Epoch;
    use bytes::Bytes;

    fn at(e: &'static str, o: u64) -> Option<StreamPosition> {
        Some(StreamPosition::new(Epoch::from_static(e), o))
    }

    fn stream(
        e: &'static str,
        top: u64,
        offs: std::ops::Range<u64>,
        next: u64,
    ) -> Result<Range, ()> {
        Ok(Range::At(Stream {
            epoch: Epoch::from_static(e),
            top,
            next,
            fork: None,
            entries: offs.map(|o| (o, Bytes::from(format!("m{o}")))).collect(),
        }))
    }

    fn answers(out: &mut Vec<BusEvent>) -> Vec<(u64, Recovery)> {
        out.drain(..)
            .map(|e| match e {
                BusEvent::History { id, answer, .. } => (id, answer),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn offsets(r: &Recovery) -> Vec<u64> {
        match r {
            Recovery::Complete { publications, .. } => {
                publications.iter().map(|p| p.pos.offset).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn asks_for_one_position_share_a_read_that_reads_on_until_the_top() {
        let mut r = Recoveries::new(1 << 20, 1 << 16);
        let mut out = Vec::new();
        r.ask(1, "c", at("e", 10), 100);
        r.ask(2, "c", at("e", 10), 100);
        r.ask(3, "c", at("e", 12), 100);
        let a = r.next_read().expect("read");
        let b = r.next_read().expect("another position, another read");
        assert!(r.next_read().is_none(), "two reads for three asks");
        assert_eq!((a.script_args(), b.from), ((&b"e"[..], 11), 13));
        r.on_range(&a, stream("e", 15, 11..13, 13), &mut out);
        assert!(out.is_empty(), "cut short: reads on");
        let a2 = r.next_read().expect("read on");
        assert_eq!(a2.from, 13);
        r.on_range(&a2, stream("e", 15, 13..16, 16), &mut out);
        r.on_range(&b, stream("e", 15, 13..16, 16), &mut out);
        let got = answers(&mut out);
        assert_eq!(got.len(), 3);
        assert_eq!(offsets(&got[0].1), [11, 12, 13, 14, 15]);
        assert_eq!(got[0].1, got[1].1, "the same answer for both askers");
        assert_eq!(offsets(&got[2].1), [13, 14, 15]);
        assert!(r.is_empty());
    }

    #[test]
    fn another_epoch_a_hole_or_more_than_the_limit_is_lost() {
        let mut out = Vec::new();
        for (reply, limit) in [
            (stream("other", 5, 1..6, 6), 100), // another epoch
            (stream("e", 20, 15..21, 21), 100), // trimmed: starts after 11
            (stream("e", 20, 11..21, 21), 5),   // more than the limit
            (Ok(Range::None), 100),             // history gone
        ] {
            let mut r = Recoveries::new(1 << 20, 1 << 16);
            r.ask(1, "c", at("e", 10), limit);
            let q = r.next_read().expect("read");
            r.on_range(&q, reply, &mut out);
            let got = answers(&mut out);
            assert!(matches!(got[0].1, Recovery::Lost { .. }), "{got:?}");
        }
        // Refused: failed (the asker may ask again); a top-only ask gets the top.
        let mut r = Recoveries::new(1 << 20, 1 << 16);
        r.ask(1, "c", at("e", 10), 100);
        r.ask(2, "d", None, 100);
        let q = r.next_read().expect("read");
        r.on_range(&q, Err(()), &mut out);
        let q = r.next_read().expect("read");
        assert_eq!(q.script_args(), (&b""[..], 0));
        r.on_range(&q, stream("e", 7, 0..0, 8), &mut out);
        let got = answers(&mut out);
        assert_eq!(got[0].1, Recovery::Failed);
        assert!(matches!(&got[1].1, Recovery::Complete { top: Some(t), .. } if t.offset == 7));
    }

    #[test]
    fn a_read_lost_with_the_link_is_sent_again_and_a_stale_reply_ignored() {
        let mut r = Recoveries::new(1 << 20, 1 << 16);
        let mut out = Vec::new();
        r.ask(1, "c", at("e", 1), 100);
        let first = r.next_read().expect("read");
        r.on_down();
        let again = r.next_read().expect("again");
        r.on_range(&first, stream("e", 2, 2..3, 3), &mut out);
        assert!(out.is_empty(), "stale");
        r.on_range(&again, stream("e", 2, 2..3, 3), &mut out);
        assert_eq!(offsets(&answers(&mut out)[0].1), [2]);
    }

    #[test]
    fn a_window_skips_a_trimmed_start_a_recovery_does_not() {
        let mut out = Vec::new();
        let mut r = Recoveries::new(1 << 20, 1 << 16);
        r.ask_window(
            1,
            "c",
            StreamPosition::new(Epoch::from_static("e"), 0),
            100,
            true,
        );
        r.ask(2, "c", at("e", 0), 100);
        let a = r.next_read().expect("window read");
        let b = r.next_read().expect("recovery read");
        r.on_range(&a, stream("e", 20, 15..21, 21), &mut out);
        r.on_range(&b, stream("e", 20, 15..21, 21), &mut out);
        let got = answers(&mut out);
        assert_eq!(offsets(&got[0].1), [15, 16, 17, 18, 19, 20]);
        assert!(matches!(got[1].1, Recovery::Lost { .. }));
    }

    #[test]
    fn what_one_answer_gathers_is_bounded() {
        let mut r = Recoveries::new(10, 1 << 16);
        let mut out = Vec::new();
        r.ask(1, "c", at("e", 0), 1000);
        let q = r.next_read().expect("read");
        r.on_range(&q, stream("e", 100, 1..101, 101), &mut out);
        assert!(matches!(answers(&mut out)[0].1, Recovery::Lost { .. }));
        assert_eq!(r.len(), 0);
    }
}
