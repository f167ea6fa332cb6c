//! The plain protocol on `/ws/<channel>`: the path names one channel, every message a
//! client sends is published to it, and a delivery is the message itself, as a
//! WebSocket frame of its kind (what Node `ws` chat servers do; byte for byte as
//! before the Centrifugo protocol existed).

use crate::hub::valid_channel_name;
use crate::ws::{self, Kind};
use bytes::Bytes;

/// Where an upgrade on `path` goes: the channel name, or the status to refuse with.
pub fn upgrade_channel<'a>(path: &'a str, default: &'a str) -> Result<&'a str, u16> {
    match path {
        "/" | "/ws" => Ok(default),
        _ => match path.strip_prefix("/ws/") {
            Some(ch) if valid_channel_name(ch) => Ok(ch),
            Some(_) => Err(400),
            None => Err(404),
        },
    }
}

/// A delivery: the message as a frame of its kind.
pub fn delivery(kind: Kind, payload: &Bytes) -> Bytes {
    ws::data_frame(kind, payload.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_paths() {
        assert_eq!(upgrade_channel("/", "d"), Ok("d"));
        assert_eq!(upgrade_channel("/ws", "d"), Ok("d"));
        assert_eq!(upgrade_channel("/ws/room.1", "d"), Ok("room.1"));
        assert_eq!(upgrade_channel("/ws/", "d"), Err(400));
        assert_eq!(upgrade_channel("/ws/a/b", "d"), Err(400));
        assert_eq!(upgrade_channel("/other", "d"), Err(404));
    }
}
