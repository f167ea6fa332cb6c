//! The channel registry: which connections are in which channels. Sans-IO.
//!
//! Two indexes, kept in step (as Redis's `pubsub.c` does): channel → members and
//! connection → channels. A connection may be in many channels; a channel exists only
//! while it has members. Joining and leaving return [`Interest`] changes — the caller
//! turns them into Redis SUBSCRIBE/UNSUBSCRIBE (or nothing, standalone). No I/O, no clock.

use std::collections::HashMap;

/// Index of a connection (its slab key, also its mio token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

/// Index of a live channel inside the hub. Reused after the channel disappears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChanId(usize);

/// What a membership change means for the backplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    /// First local member: the instance must start receiving this channel.
    Subscribe(Box<str>),
    /// Last local member left: the instance should stop receiving it.
    Unsubscribe(Box<str>),
}

#[derive(Debug)]
struct Channel {
    name: Box<str>,
    /// Members in join order (swap-removed, so order is not meaningful after a leave).
    members: Vec<ConnId>,
}

/// The registry. Memory per membership: one `ConnId` in the channel plus one
/// `(ChanId, u32)` in the connection's list.
#[derive(Debug, Default)]
pub struct Hub {
    channels: slab::Slab<Channel>,
    by_name: HashMap<Box<str>, ChanId>,
    /// Indexed by `ConnId.0` (slab keys are dense): the channels a connection is in and
    /// its position in each channel's member list, for O(1) removal.
    conn_channels: Vec<Vec<(ChanId, u32)>>,
}

/// Channel names: 1–128 bytes of `A-Za-z0-9_.:-`.
pub fn valid_channel_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Adds `conn` to `name`. Returns `Some(Subscribe)` when it is the channel's first
    /// member. Joining a channel twice is a no-op.
    pub fn join(&mut self, conn: ConnId, name: &str) -> Option<Interest> {
        if self.conn_channels.len() <= conn.0 {
            self.conn_channels.resize_with(conn.0 + 1, Vec::new);
        }
        let (chan, created) = match self.by_name.get(name) {
            Some(&c) => (c, false),
            None => {
                let c = ChanId(self.channels.insert(Channel {
                    name: name.into(),
                    members: Vec::new(),
                }));
                self.by_name.insert(name.into(), c);
                (c, true)
            }
        };
        if self.conn_channels[conn.0].iter().any(|(c, _)| *c == chan) {
            return None;
        }
        let members = &mut self.channels[chan.0].members;
        let pos = members.len() as u32;
        members.push(conn);
        self.conn_channels[conn.0].push((chan, pos));
        created.then(|| Interest::Subscribe(name.into()))
    }

    /// Removes `conn` from `name`; `Some(Unsubscribe)` when the channel became empty.
    pub fn leave(&mut self, conn: ConnId, name: &str) -> Option<Interest> {
        let chan = *self.by_name.get(name)?;
        let list = self.conn_channels.get_mut(conn.0)?;
        let i = list.iter().position(|(c, _)| *c == chan)?;
        let (_, pos) = list.swap_remove(i);
        self.remove_member(chan, pos)
    }

    /// Removes `conn` from every channel (it disconnected).
    pub fn leave_all(&mut self, conn: ConnId) -> Vec<Interest> {
        let Some(list) = self.conn_channels.get_mut(conn.0) else {
            return Vec::new();
        };
        let list = std::mem::take(list);
        list.into_iter()
            .filter_map(|(chan, pos)| self.remove_member(chan, pos))
            .collect()
    }

    fn remove_member(&mut self, chan: ChanId, pos: u32) -> Option<Interest> {
        let members = &mut self.channels[chan.0].members;
        members.swap_remove(pos as usize);
        if let Some(&moved) = members.get(pos as usize) {
            // The last member now sits at `pos`: fix its back-reference.
            if let Some(entry) = self.conn_channels[moved.0]
                .iter_mut()
                .find(|(c, _)| *c == chan)
            {
                entry.1 = pos;
            }
        }
        if !members.is_empty() {
            return None;
        }
        let ch = self.channels.remove(chan.0);
        self.by_name.remove(&ch.name);
        Some(Interest::Unsubscribe(ch.name))
    }

    /// The local members of `name` (empty when nobody here is in it).
    pub fn members(&self, name: &str) -> &[ConnId] {
        match self.by_name.get(name) {
            Some(c) => &self.channels[c.0].members,
            None => &[],
        }
    }

    /// The channels `conn` is in.
    pub fn channels_of(&self, conn: ConnId) -> impl Iterator<Item = &str> {
        self.conn_channels
            .get(conn.0)
            .into_iter()
            .flatten()
            .map(|(c, _)| &*self.channels[c.0].name)
    }

    /// Number of channels with at least one local member.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(s: &str) -> Option<Interest> {
        Some(Interest::Subscribe(s.into()))
    }
    fn unsub(s: &str) -> Option<Interest> {
        Some(Interest::Unsubscribe(s.into()))
    }

    #[test]
    fn first_join_subscribes_last_leave_unsubscribes() {
        let mut h = Hub::new();
        assert_eq!(h.join(ConnId(1), "a"), sub("a"));
        assert_eq!(h.join(ConnId(2), "a"), None);
        assert_eq!(h.join(ConnId(2), "a"), None, "double join is a no-op");
        assert_eq!(h.members("a"), &[ConnId(1), ConnId(2)]);
        assert_eq!(h.leave(ConnId(1), "a"), None);
        assert_eq!(h.members("a"), &[ConnId(2)]);
        assert_eq!(h.leave(ConnId(2), "a"), unsub("a"));
        assert_eq!(h.channel_count(), 0);
        assert!(h.members("a").is_empty());
        assert_eq!(h.leave(ConnId(2), "a"), None, "leaving twice is a no-op");
    }

    #[test]
    fn many_channels_per_connection() {
        let mut h = Hub::new();
        assert_eq!(h.join(ConnId(0), "a"), sub("a"));
        assert_eq!(h.join(ConnId(0), "b"), sub("b"));
        assert_eq!(h.join(ConnId(5), "b"), None);
        let mut chans: Vec<_> = h.channels_of(ConnId(0)).collect();
        chans.sort();
        assert_eq!(chans, ["a", "b"]);
        let mut out = h.leave_all(ConnId(0));
        out.sort_by_key(|i| format!("{i:?}"));
        assert_eq!(out, vec![Interest::Unsubscribe("a".into())]);
        assert_eq!(h.members("b"), &[ConnId(5)]);
        assert_eq!(
            h.leave_all(ConnId(5)),
            vec![Interest::Unsubscribe("b".into())]
        );
        assert_eq!(h.channel_count(), 0);
    }

    #[test]
    fn swap_remove_keeps_back_references_right() {
        let mut h = Hub::new();
        for i in 0..100 {
            h.join(ConnId(i), "x");
            h.join(ConnId(i), if i % 2 == 0 { "even" } else { "odd" });
        }
        // Remove in an order that moves members around a lot.
        for i in (0..100).step_by(3).chain((1..100).step_by(3)) {
            h.leave_all(ConnId(i));
        }
        let mut left: Vec<usize> = h.members("x").iter().map(|c| c.0).collect();
        left.sort();
        let expect: Vec<usize> = (2..100).step_by(3).collect();
        assert_eq!(left, expect);
        for c in expect {
            assert_eq!(h.leave(ConnId(c), "x").is_some(), c == 98);
        }
        assert!(h.members("x").is_empty());
    }

    #[test]
    fn channel_names_are_validated() {
        assert!(valid_channel_name("chat_messages"));
        assert!(valid_channel_name("a.b:c-d_9"));
        assert!(valid_channel_name(&"x".repeat(128)));
        for bad in ["", "a b", "a/b", "ü", "a%20", &"x".repeat(129)] {
            assert!(!valid_channel_name(bad), "{bad:?}");
        }
    }
}
