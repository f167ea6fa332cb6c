//! Client protocols: what a client may say, parsed at the edge, and how deliveries are
//! encoded for it. The loop knows them through [`Proto`]: plain frames on
//! `/ws/<channel>` (one channel, a message is a publish) and Centrifugo's JSON protocol
//! on `/connection/websocket` (many channels, commands, recovery), whose codec is
//! [`centrifugo`].

pub mod centrifugo;

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
