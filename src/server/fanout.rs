//! Fan-out and writing: one encoded frame queued to every member, flushed once per
//! iteration, slow consumers closed after the fan-out.

use super::centrifugo::Hold;
use super::{Server, WRITE_BUDGET};
use crate::backplane::BusEvent;
use crate::conn::{Conn, Phase, Reason};
use crate::hub::ConnId;
use crate::outq::{Flushed, OutQueue, WriteStats};
use crate::protocol::Proto;
use crate::ws::{self, Kind};
use bytes::Bytes;
use log::{debug, warn};
use mio::{Interest as Ready, Token};
use std::net::Shutdown;
use std::time::Instant;

/// Whether a frame fits a connection's output cap.
enum Room {
    Fits,
    /// Over the cap even after writing what the kernel would take: a slow consumer.
    Full,
    /// The socket failed while writing; the connection is closed at its flush.
    Broken,
    /// Already found full in this iteration (listed once in `Server::slow`).
    Marked,
}

/// Makes room for `len` more bytes under `max`: when the queue would go over, first
/// writes what the kernel takes now, so a client is slow only for bytes it really left
/// unread, not for a burst that arrived within one loop iteration.
///
/// A connection found full is marked once (`Conn::slow`): later frames of the same
/// burst neither try another write nor list it again.
fn make_room(c: &mut Conn, len: usize, max: usize, stats: &mut WriteStats) -> Room {
    if c.slow {
        return Room::Marked;
    }
    let need = OutQueue::cost_with(len);
    if c.out.cost() + need <= max {
        return Room::Fits;
    }
    match c.out.flush_to(&mut c.stream, usize::MAX, stats) {
        Ok(_) if c.out.cost() + need <= max => Room::Fits,
        Ok(_) => {
            c.slow = true;
            Room::Full
        }
        Err(_) => Room::Broken,
    }
}

impl Server {
    pub(super) fn drain_bus(&mut self, now: Instant) {
        let mut evs = std::mem::take(&mut self.bus_events);
        self.bus.drain(&mut evs);
        for ev in evs.drain(..) {
            match ev {
                BusEvent::Deliver {
                    channel,
                    kind,
                    payload,
                    pos,
                } => self.fan_out(&channel, kind, payload, pos),
                BusEvent::History {
                    id,
                    channel,
                    answer,
                } => self.on_history(id, &channel, answer),
                BusEvent::Gap(channel) => self.on_gap(&channel),
                BusEvent::Subscribed(channel) => {
                    self.release_waiting(&channel, now);
                    self.on_subscribed_protocol(&channel);
                }
            }
        }
        self.bus_events = evs;
    }

    /// Encodes the frame once per protocol (plain, Centrifugo push: only if a member
    /// speaks it) and queues the same bytes to every open local member. A Centrifugo
    /// member still setting up this channel has the push held instead (merged after its
    /// subscribe reply).
    pub(super) fn fan_out(
        &mut self,
        channel: &str,
        kind: Kind,
        payload: Bytes,
        pos: Option<crate::message::StreamPosition>,
    ) {
        let members = self.hub.members(channel);
        if members.is_empty() {
            return;
        }
        let mut plain: Option<Bytes> = None;
        let mut push: Option<Bytes> = None;
        let max = self.cfg.max_outbound_bytes;
        for &m in members {
            let Some(c) = self.conns.get_mut(m.0) else {
                continue;
            };
            if !c.is_open() {
                continue;
            }
            let proto = c.proto;
            let encoded = match proto {
                Proto::Plain => &mut plain,
                Proto::Centrifugo => &mut push,
            };
            let frame = encoded
                .get_or_insert_with(|| proto.delivery(channel, kind, &payload, pos.as_ref()))
                .clone();
            let frame = match proto {
                Proto::Plain => frame,
                Proto::Centrifugo => {
                    let offset = pos.as_ref().map(|p| p.offset);
                    match self
                        .sessions
                        .get_mut(&m.0)
                        .map(|s| s.hold(channel, offset, &frame, max))
                    {
                        Some(Hold::Held | Hold::Covered) => continue,
                        Some(Hold::Over) => {
                            self.slow.push(m);
                            continue;
                        }
                        Some(Hold::No) | None => frame,
                    }
                }
            };
            match make_room(c, frame.len(), max, &mut self.metrics.writes) {
                Room::Fits => {
                    c.out.push(frame);
                    self.metrics.messages_delivered += 1;
                }
                Room::Full => self.slow.push(m),
                // Broken: flush_one reports the error and closes it.
                Room::Broken | Room::Marked => {}
            }
            if !c.in_flush_list {
                c.in_flush_list = true;
                self.flush_list.push(m);
            }
        }
    }

    /// Marked during the fan-out, closed after it (never inside it).
    pub(super) fn close_slow_consumers(&mut self, now: Instant) {
        for id in std::mem::take(&mut self.slow) {
            let Some(c) = self.conns.get_mut(id.0) else {
                continue;
            };
            if !c.is_open() {
                continue;
            }
            debug!(
                "conn={} peer={} slow consumer: {} bytes queued",
                id.0,
                c.peer,
                c.out.len()
            );
            let frame = ws::close_frame(1008, "slow consumer");
            if c.out.cost() + OutQueue::cost_with(frame.len()) <= self.cfg.max_outbound_bytes {
                self.begin_close(id, Reason::SlowConsumer, Some(frame), now);
            } else {
                self.drop_conn(id, Reason::SlowConsumer);
            }
        }
    }

    /// The channel is subscribed: complete the upgrades that were waiting for it.
    pub(super) fn release_waiting(&mut self, channel: &str, now: Instant) {
        let waiting: Vec<ConnId> = self
            .hub
            .members(channel)
            .iter()
            .copied()
            .filter(|m| {
                self.conns.get(m.0).is_some_and(
                    |c| matches!(&c.phase, Phase::AwaitSub(h) if &*h.channel == channel),
                )
            })
            .collect();
        for id in waiting {
            self.open_ws(id, now);
        }
    }

    /// Sends the held 101 and starts speaking WebSocket.
    pub(super) fn open_ws(&mut self, id: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        let Phase::AwaitSub(held) = std::mem::replace(&mut c.phase, Phase::Open) else {
            return;
        };
        c.deadline = None;
        c.alive = true;
        c.tokens = self.cfg.max_messages_burst as f32;
        c.refilled = now;
        debug!(
            "conn={} peer={} joined channel={}",
            id.0, c.peer, held.channel
        );
        self.queue(id, held.response);
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        if !c.inbuf.is_empty() {
            let mut early = std::mem::take(&mut c.inbuf);
            self.on_ws_bytes(id, &mut early, now);
        }
    }

    /// Queues bytes for one connection. On an open WebSocket they count against
    /// `--max-outbound-bytes` like a fan-out (pongs included: a client that pings and
    /// never reads is a slow consumer). HTTP responses are checked before each request
    /// is handled instead (`process_http`).
    pub(super) fn queue(&mut self, id: ConnId, bytes: Bytes) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        if c.is_open() {
            match make_room(
                c,
                bytes.len(),
                self.cfg.max_outbound_bytes,
                &mut self.metrics.writes,
            ) {
                Room::Fits => c.out.push(bytes),
                Room::Full => self.slow.push(id),
                Room::Broken | Room::Marked => {}
            }
        } else {
            c.out.push(bytes);
        }
        self.mark_flush(id);
    }

    pub(super) fn mark_flush(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id.0) {
            if !c.in_flush_list {
                c.in_flush_list = true;
                self.flush_list.push(id);
            }
        }
    }

    pub(super) fn flush_all(&mut self) {
        let list = std::mem::take(&mut self.flush_list);
        for &id in &list {
            self.flush_one(id);
        }
        let mut list = list;
        list.clear();
        if self.flush_list.is_empty() {
            self.flush_list = list; // keep the allocation
        }
    }

    pub(super) fn flush_one(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        c.in_flush_list = false;
        let registered = match c
            .out
            .flush_to(&mut c.stream, WRITE_BUDGET, &mut self.metrics.writes)
        {
            Ok(Flushed::All) => {
                if matches!(c.phase, Phase::Closing) && !c.write_shut {
                    c.write_shut = true;
                    let _ = c.stream.shutdown(Shutdown::Write);
                }
                if c.want_write {
                    c.want_write = false;
                    self.poll
                        .registry()
                        .reregister(&mut c.stream, Token(id.0), Ready::READABLE)
                } else {
                    Ok(())
                }
            }
            Ok(Flushed::Partial) => {
                if !c.want_write {
                    c.want_write = true;
                    self.poll.registry().reregister(
                        &mut c.stream,
                        Token(id.0),
                        Ready::READABLE | Ready::WRITABLE,
                    )
                } else {
                    Ok(())
                }
            }
            Ok(Flushed::Capped) => {
                // Fairness: others get their turn; continue next iteration.
                c.in_flush_list = true;
                self.flush_list.push(id);
                Ok(())
            }
            Err(e) => {
                debug!("conn={} write error: {e}", id.0);
                return self.drop_conn(id, Reason::PeerGone);
            }
        };
        if let Err(e) = registered {
            // Without WRITABLE interest its leftovers would never be written.
            warn!("conn={} reregister failed: {e}", id.0);
            self.drop_conn(id, Reason::IoError);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose peer never reads: it fits until kernel and queue are full,
    /// then is found full once, and later frames of the burst cost no write attempt.
    #[test]
    fn a_full_connection_is_marked_once_and_not_written_again_in_the_burst() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let _peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, addr) = listener.accept().expect("accept");
        ours.set_nonblocking(true).expect("nonblocking");
        let stream = mio::net::TcpStream::from_std(ours);
        let mut c = Conn::new(stream, addr, 1, Instant::now());
        let mut stats = WriteStats::default();
        let frame = Bytes::from(vec![0u8; 16 * 1024]);
        let max = 64 * 1024;
        let mut pushed = 0;
        loop {
            match make_room(&mut c, frame.len(), max, &mut stats) {
                Room::Fits => c.out.push(frame.clone()),
                Room::Full => break,
                Room::Broken | Room::Marked => panic!("broken or marked before full"),
            }
            pushed += 1;
            assert!(pushed < 100_000, "the kernel took everything?");
        }
        assert!(c.slow && c.out.cost() <= max);
        let writes = stats.writes;
        for _ in 0..1000 {
            assert!(matches!(
                make_room(&mut c, frame.len(), max, &mut stats),
                Room::Marked
            ));
        }
        assert_eq!(stats.writes, writes, "nothing written once marked");
    }
}
