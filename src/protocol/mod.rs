//! Client protocols: what a client may say, parsed at the edge, and how deliveries are
//! encoded for it. The loop knows them through [`Proto`] and its one encoding
//! interface ([`Proto::delivery`]): [`plain`] frames on `/ws/<channel>` (one channel,
//! a message is a publish) and [`centrifugo`]'s JSON protocol on
//! `/connection/websocket` (many channels, commands, recovery). Both speak in the
//! backplane seam's terms (positions, publications), never of a backplane or the loop
//! (`tests/structure.rs`).

pub mod centrifugo;
pub mod plain;

use crate::message::StreamPosition;
use crate::ws::Kind;
use bytes::Bytes;

/// Which protocol a WebSocket connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Proto {
    /// `/ws/<channel>`: every message is published to the channel; deliveries are the
    /// messages themselves.
    #[default]
    Plain,
    /// `/connection/websocket`: Centrifugo's JSON client protocol.
    Centrifugo,
}

impl Proto {
    /// A delivery on `channel` as this protocol's frame: encoded once per protocol per
    /// message, the same bytes for every member speaking it.
    pub fn delivery(
        self,
        channel: &str,
        kind: Kind,
        payload: &Bytes,
        pos: Option<&StreamPosition>,
    ) -> Bytes {
        match self {
            Proto::Plain => plain::delivery(kind, payload),
            Proto::Centrifugo => {
                let p = centrifugo::pub_push(channel, kind, payload, pos);
                crate::ws::data_frame(Kind::Text, Bytes::from(p))
            }
        }
    }
}
