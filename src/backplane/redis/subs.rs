//! The subscription set, sans-IO: which channels local members want, which SUBSCRIBE /
//! UNSUBSCRIBE are in flight, which Redis has confirmed. Inputs are interest changes,
//! acknowledgements and the link going up or down; outputs are the commands to send and
//! the channels that just became confirmed. No sockets, no clock.

use std::collections::HashMap;

/// Channels per SUBSCRIBE command when re-subscribing many at once.
pub const SUBSCRIBE_BATCH: usize = 1000;

/// One channel's life: wanted → pending → confirmed → (unwanted) leaving → gone.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Sub {
    /// Local members want it.
    wanted: bool,
    /// SUBSCRIBE/UNSUBSCRIBE sent and not yet acknowledged.
    pending: u32,
    /// Redis confirmed the subscription and nothing newer is in flight.
    confirmed: bool,
}

/// Every channel this instance holds or is changing at Redis.
#[derive(Debug, Default)]
pub struct Subscriptions {
    /// Redis channel = prefix + channel.
    prefix: String,
    subs: HashMap<Box<str>, Sub>,
    /// Redis Cluster: shard channels (`SSUBSCRIBE`, one channel per command: channels
    /// of different slots may not share one).
    sharded: bool,
}

impl Subscriptions {
    pub fn new(prefix: &str) -> Subscriptions {
        Subscriptions {
            prefix: prefix.to_string(),
            subs: HashMap::new(),
            sharded: false,
        }
    }

    /// Shard channels (Redis Cluster's sharded Pub/Sub).
    pub fn sharded(mut self) -> Subscriptions {
        self.sharded = true;
        self
    }

    fn verb(&self, on: bool) -> &'static str {
        match (self.sharded, on) {
            (false, true) => "SUBSCRIBE",
            (false, false) => "UNSUBSCRIBE",
            (true, true) => "SSUBSCRIBE",
            (true, false) => "SUNSUBSCRIBE",
        }
    }

    /// Redis dropped a shard channel on its own (`sunsubscribe` with nothing pending:
    /// its slot moved): no longer confirmed; the next `on_up` or `again` subscribes it.
    /// Returns whether it is wanted.
    pub fn on_lost(&mut self, redis_name: &[u8]) -> bool {
        let Some(name) = self.local_name(redis_name) else {
            return false;
        };
        match self.subs.get_mut(name) {
            Some(s) if s.pending == 0 && s.wanted => {
                s.confirmed = false;
                true
            }
            _ => false,
        }
    }

    /// Whether an acknowledgement for `redis_name` is awaited.
    pub fn is_pending(&self, redis_name: &[u8]) -> bool {
        self.local_name(redis_name)
            .and_then(|n| self.subs.get(n))
            .is_some_and(|s| s.pending > 0)
    }

    /// Wanted channels not confirmed and with nothing in flight (lost, or refused with
    /// `MOVED`): subscribe them again (the link is up).
    pub fn again(&mut self) -> Vec<redis::Cmd> {
        let mut names: Vec<Box<str>> = self
            .subs
            .iter()
            .filter(|(_, s)| s.wanted && !s.confirmed && s.pending == 0)
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
            .iter()
            .map(|n| {
                if let Some(s) = self.subs.get_mut(n) {
                    s.pending = 1;
                }
                redis::cmd(self.verb(true)).arg(self.redis_name(n)).clone()
            })
            .collect()
    }

    /// A `MOVED` (or other) refusal of the oldest subscribe in flight: nothing is
    /// confirmed for it; it stays wanted (`again` later, or it moves to another shard).
    pub fn on_refused(&mut self) {
        if let Some(s) = self.subs.values_mut().find(|s| s.pending > 0) {
            s.pending -= 1;
        }
    }

    /// Stops tracking a channel (it moves to another link): whether it was wanted.
    pub fn forget(&mut self, channel: &str) -> bool {
        self.subs.remove(channel).is_some_and(|s| s.wanted)
    }

    /// Wanted channels.
    pub fn wanted(&self) -> Vec<String> {
        self.subs
            .iter()
            .filter(|(_, s)| s.wanted)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    pub fn redis_name(&self, channel: &str) -> String {
        format!("{}{}", self.prefix, channel)
    }

    /// The local channel of a Redis channel name (`None`: not ours, or not UTF-8).
    pub fn local_name<'a>(&self, redis_name: &'a [u8]) -> Option<&'a str> {
        redis_name
            .strip_prefix(self.prefix.as_bytes())
            .and_then(|n| std::str::from_utf8(n).ok())
    }

    /// The first local member joined: SUBSCRIBE now if the link is up (else on up).
    pub fn want(&mut self, channel: &str, link_up: bool) -> Option<redis::Cmd> {
        let name = self.redis_name(channel);
        let s = self.subs.entry(channel.into()).or_default();
        s.wanted = true;
        if !link_up {
            return None;
        }
        s.pending += 1;
        Some(redis::cmd(self.verb(true)).arg(name).clone())
    }

    /// The last local member left: UNSUBSCRIBE now if the link is up.
    pub fn unwant(&mut self, channel: &str, link_up: bool) -> Option<redis::Cmd> {
        let name = self.redis_name(channel);
        let s = self.subs.get_mut(channel)?;
        s.wanted = false;
        s.confirmed = false;
        if link_up {
            s.pending += 1;
            return Some(redis::cmd(self.verb(false)).arg(name).clone());
        }
        if s.pending == 0 {
            self.subs.remove(channel);
        }
        None
    }

    /// A `subscribe` or `unsubscribe` acknowledgement for `redis_name`. Returns the local
    /// channel when it has just become confirmed (held upgrades for it may complete).
    pub fn on_ack(&mut self, redis_name: &[u8]) -> Option<String> {
        let name = self.local_name(redis_name)?;
        let s = self.subs.get_mut(name)?;
        s.pending = s.pending.saturating_sub(1);
        if s.pending > 0 {
            return None;
        }
        if !s.wanted {
            self.subs.remove(name);
            return None;
        }
        if s.confirmed {
            return None;
        }
        s.confirmed = true;
        Some(name.to_string())
    }

    /// The link is up: SUBSCRIBE everything wanted, in batches; forget the rest.
    pub fn on_up(&mut self) -> Vec<redis::Cmd> {
        self.subs.retain(|_, s| s.wanted);
        let mut names: Vec<Box<str>> = self.subs.keys().cloned().collect();
        names.sort(); // deterministic order (tests, logs)
        let mut cmds = Vec::new();
        let batch = if self.sharded { 1 } else { SUBSCRIBE_BATCH };
        for chunk in names.chunks(batch) {
            let mut c = redis::cmd(self.verb(true));
            for n in chunk {
                c.arg(self.redis_name(n));
                if let Some(s) = self.subs.get_mut(n) {
                    s.pending = 1;
                    s.confirmed = false;
                }
            }
            cmds.push(c);
        }
        cmds
    }

    /// The link is lost: nothing is in flight or confirmed any more.
    pub fn on_down(&mut self) {
        self.subs.retain(|_, s| s.wanted);
        for s in self.subs.values_mut() {
            s.pending = 0;
            s.confirmed = false;
        }
    }

    /// Local members want it (messages for other channels are late arrivals after an
    /// UNSUBSCRIBE and are not delivered).
    pub fn is_wanted(&self, channel: &str) -> bool {
        self.subs.get(channel).is_some_and(|s| s.wanted)
    }

    pub fn is_confirmed(&self, channel: &str) -> bool {
        self.subs.get(channel).is_some_and(|s| s.confirmed)
    }

    /// Every wanted channel is confirmed.
    pub fn all_confirmed(&self) -> bool {
        self.subs.values().all(|s| !s.wanted || s.confirmed)
    }

    /// Channels tracked (wanted, or leaving with an UNSUBSCRIBE in flight).
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }
}

/// What a value on the subscription link is.
#[derive(Debug, PartialEq, Eq)]
pub enum SubReply {
    /// A published message: Redis channel and payload.
    Message { channel: Vec<u8>, payload: Vec<u8> },
    /// `subscribe` / `unsubscribe` acknowledgement for a Redis channel (also
    /// `ssubscribe`, and `sunsubscribe`, which Redis also sends on its own when a shard
    /// channel's slot moves away: `RedisLink` tells them apart).
    Ack(Vec<u8>),
    /// An error reply (`MOVED` to a shard subscription): its text.
    Refused(String),
    /// The answer to a PING: `+PONG` on a connection subscribed to nothing, the
    /// `["pong", ""]` push in subscribed mode.
    Pong,
    /// A push of another kind (ignored, logged at debug).
    Other(String),
}

/// Sorts out a value read on the subscription link (after its handshake). An error
/// means the link must be dropped.
pub fn classify(v: redis::Value) -> Result<SubReply, String> {
    use redis::Value;
    let items = match v {
        Value::Array(items) => items,
        Value::SimpleString(s) if s.eq_ignore_ascii_case("PONG") => return Ok(SubReply::Pong),
        Value::ServerError(e) => {
            return Ok(SubReply::Refused(format!(
                "{} {}",
                e.code(),
                e.details().unwrap_or("")
            )))
        }
        other => return Err(format!("unexpected reply {other:?}")),
    };
    let mut it = items.into_iter();
    let kind = match it.next() {
        Some(Value::BulkString(k)) => k,
        other => return Err(format!("unexpected push {other:?}")),
    };
    match &kind[..] {
        b"message" | b"smessage" => match (it.next(), it.next()) {
            (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) => {
                Ok(SubReply::Message { channel, payload })
            }
            _ => Err("malformed message push".to_string()),
        },
        b"subscribe" | b"unsubscribe" | b"ssubscribe" | b"sunsubscribe" => match it.next() {
            Some(Value::BulkString(ch)) => Ok(SubReply::Ack(ch)),
            _ => Err("malformed subscription acknowledgement".to_string()),
        },
        b"pong" => Ok(SubReply::Pong),
        other => Ok(SubReply::Other(String::from_utf8_lossy(other).into_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn every_reply_the_subscription_link_can_get() {
        let pong_push = Value::Array(vec![bulk("pong"), bulk("")]);
        assert_eq!(classify(pong_push), Ok(SubReply::Pong));
        assert_eq!(
            classify(Value::SimpleString("PONG".into())),
            Ok(SubReply::Pong),
            "PING while subscribed to nothing"
        );
        let msg = Value::Array(vec![bulk("message"), bulk("p:c"), bulk("hi")]);
        assert_eq!(
            classify(msg),
            Ok(SubReply::Message {
                channel: b"p:c".to_vec(),
                payload: b"hi".to_vec()
            })
        );
        let ack = Value::Array(vec![bulk("subscribe"), bulk("p:c"), Value::Int(1)]);
        assert_eq!(classify(ack), Ok(SubReply::Ack(b"p:c".to_vec())));
        let ack = Value::Array(vec![bulk("unsubscribe"), bulk("p:c"), Value::Int(0)]);
        assert_eq!(classify(ack), Ok(SubReply::Ack(b"p:c".to_vec())));
        let other = Value::Array(vec![bulk("pmessage"), bulk("x")]);
        assert!(matches!(classify(other), Ok(SubReply::Other(_))));
        let err = redis::parse_redis_value(b"-ERR nope\r\n").expect("an error reply");
        assert!(
            matches!(classify(err), Ok(SubReply::Refused(_))),
            "an error reply is the cluster's business (MOVED), or fails the link there"
        );
        for bad in [
            Value::Int(3),
            Value::Nil,
            Value::SimpleString("OK".into()),
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![bulk("message"), bulk("c")]),
            Value::Array(vec![bulk("subscribe")]),
        ] {
            assert!(classify(bad.clone()).is_err(), "{bad:?}");
        }
    }

    /// Redis Cluster: shard channels, one per command; a `sunsubscribe` nobody asked
    /// for (the slot moved) unconfirms the channel, and `again` subscribes it anew.
    #[test]
    fn shard_channels_one_per_command_and_lost_ones_again() {
        let mut s = Subscriptions::new("p:").sharded();
        assert!(s.want("a", false).is_none());
        assert!(s.want("b", false).is_none());
        let up = s.on_up();
        assert_eq!(up.len(), 2, "one SSUBSCRIBE per channel");
        assert!(packed(&up[0]).contains("SSUBSCRIBE") && packed(&up[0]).contains("p:a"));
        assert_eq!(s.on_ack(b"p:a"), Some("a".into()));
        assert_eq!(s.on_ack(b"p:b"), Some("b".into()));
        assert!(!s.is_pending(b"p:a"));
        assert!(s.on_lost(b"p:a"), "dropped by Redis");
        assert!(!s.is_confirmed("a") && !s.all_confirmed());
        let again = s.again();
        assert_eq!(again.len(), 1);
        assert!(packed(&again[0]).contains("p:a"));
        assert!(s.is_pending(b"p:a"));
        s.on_refused();
        assert!(!s.is_pending(b"p:a"), "MOVED: nothing in flight for it");
        assert!(s.forget("a"));
        assert_eq!(s.wanted(), vec!["b".to_string()]);
        let off = s.unwant("b", true).expect("SUNSUBSCRIBE");
        assert!(packed(&off).contains("SUNSUBSCRIBE"));
        for (kind, want) in [
            ("smessage", true),
            ("ssubscribe", false),
            ("sunsubscribe", false),
        ] {
            let v = Value::Array(vec![bulk(kind), bulk("p:b"), bulk("x")]);
            let r = classify(v).expect("classified");
            assert_eq!(matches!(r, SubReply::Message { .. }), want, "{kind}");
        }
    }

    fn packed(c: &redis::Cmd) -> String {
        String::from_utf8(c.get_packed_command()).unwrap()
    }

    #[test]
    fn want_sends_subscribe_only_while_up_and_confirms_on_ack() {
        let mut s = Subscriptions::new("p:");
        assert!(s.want("a", false).is_none(), "down: remembered, not sent");
        assert!(!s.all_confirmed());
        let cmds = s.on_up();
        assert_eq!(cmds.len(), 1);
        assert!(packed(&cmds[0]).contains("p:a"));
        assert_eq!(s.on_ack(b"p:a"), Some("a".to_string()));
        assert!(s.is_confirmed("a") && s.all_confirmed());
        assert_eq!(
            s.on_ack(b"p:a"),
            None,
            "a stray second ack confirms nothing new"
        );
        let c = s.want("b", true).expect("up: sent at once");
        assert!(packed(&c).contains("SUBSCRIBE") && packed(&c).contains("p:b"));
        assert!(!s.all_confirmed());
        assert_eq!(s.on_ack(b"other:b"), None, "another prefix is not ours");
        assert_eq!(s.on_ack(b"p:b"), Some("b".to_string()));
    }

    #[test]
    fn leaving_and_rejoining_before_the_acks_ends_confirmed() {
        let mut s = Subscriptions::new("");
        s.want("a", true);
        s.unwant("a", true).expect("unsubscribe sent");
        s.want("a", true).expect("subscribe sent again");
        // Three commands in flight: only the last ack confirms.
        assert_eq!(s.on_ack(b"a"), None);
        assert_eq!(s.on_ack(b"a"), None);
        assert!(!s.is_confirmed("a"));
        assert_eq!(s.on_ack(b"a"), Some("a".to_string()));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn an_unwanted_channel_is_forgotten_once_its_unsubscribe_is_acked() {
        let mut s = Subscriptions::new("");
        s.want("a", true);
        s.on_ack(b"a");
        s.unwant("a", true).expect("sent");
        assert!(!s.is_confirmed("a"));
        assert_eq!(s.len(), 1, "kept until acknowledged");
        assert_eq!(s.on_ack(b"a"), None);
        assert!(s.is_empty());
        // Down: no command, forgotten at once.
        s.want("b", false);
        assert!(s.unwant("b", false).is_none());
        assert!(s.is_empty());
    }

    #[test]
    fn a_lost_link_resets_everything_and_up_resubscribes_in_batches() {
        let mut s = Subscriptions::new("");
        for i in 0..(SUBSCRIBE_BATCH + 5) {
            s.want(&format!("c{i}"), false);
        }
        s.want("gone", false);
        s.unwant("gone", false);
        let cmds = s.on_up();
        assert_eq!(cmds.len(), 2, "two batches");
        for i in 0..(SUBSCRIBE_BATCH + 5) {
            s.on_ack(format!("c{i}").as_bytes());
        }
        assert!(s.all_confirmed());
        s.on_down();
        assert!(!s.all_confirmed() && !s.is_confirmed("c1"));
        assert_eq!(s.on_up().len(), 2);
        assert_eq!(s.len(), SUBSCRIBE_BATCH + 5);
    }
}
