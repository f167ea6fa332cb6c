//! Following a primary through Redis Sentinel, sans-IO: which sentinel to ask next,
//! what to send once a sentinel link is up, and what each value it sends back means.
//!
//! A third link (beside the subscription and publish links) goes to one sentinel at a
//! time. Once up it asks `SENTINEL GET-MASTER-ADDR-BY-NAME <master>` and subscribes to
//! `+switch-master`, so a failover is heard the moment the sentinels decide it. The
//! data links connect only to an address a sentinel gave, and only stay if `ROLE` there
//! says `master` (a replica is never used as the primary); any data link failure, and
//! a `ROLE` that is not `master`, asks the sentinels again (the link to them restarts,
//! on the next sentinel). A sentinel that does not know the master, or answers
//! nonsense, fails its link: the next one is asked after the backoff.

use super::super::target::Sentinel;
use redis::Value;

/// Where the sentinel link is in its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Up, the address asked: its reply comes first.
    Asked,
    /// The address answered; the `+switch-master` subscription comes next.
    Subscribing,
    /// Subscribed: `+switch-master` messages and PING replies.
    Watching,
}

/// What a value on the sentinel link said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    Nothing,
    /// The master's address, as the sentinel knows it now.
    Primary(String, u16),
    /// A reply to a periodic PING.
    Pong,
}

#[derive(Debug)]
pub struct Sentinels {
    spec: Sentinel,
    /// The sentinel the next connect goes to (rotates on every attempt).
    next: usize,
    step: Step,
}

impl Sentinels {
    pub fn new(spec: Sentinel) -> Sentinels {
        Sentinels {
            spec,
            next: 0,
            step: Step::Asked,
        }
    }

    pub fn master(&self) -> &str {
        &self.spec.master
    }

    /// The sentinel to connect to now; the attempt after goes to the next one.
    pub fn pick(&mut self) -> (String, u16) {
        let n = self.spec.sentinels.len().max(1);
        let s = self.spec.sentinels[self.next % n].clone();
        self.next = (self.next + 1) % n;
        s
    }

    /// The link to a sentinel is up (a PING answered): ask for the address, then
    /// watch for failovers.
    pub fn on_up(&mut self) -> Vec<redis::Cmd> {
        self.step = Step::Asked;
        vec![
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&self.spec.master)
                .clone(),
            redis::cmd("SUBSCRIBE").arg("+switch-master").clone(),
        ]
    }

    /// A value from the sentinel link (after the handshake). `Err`: the link is of no
    /// use (unknown master, an error, not a sentinel): drop it, ask the next one.
    pub fn on_value(&mut self, v: Value) -> Result<Heard, String> {
        match (self.step, v) {
            (_, Value::ServerError(e)) => Err(format!("sentinel said {e:?}")),
            (Step::Asked, Value::Nil) => Err(format!(
                "this sentinel does not know a master named {:?}",
                self.spec.master
            )),
            (Step::Asked, Value::Array(a)) => {
                self.step = Step::Subscribing;
                match &a[..] {
                    [h, p] => address(h, p)
                        .map(|(h, p)| Heard::Primary(h, p))
                        .ok_or_else(|| "sentinel gave a malformed address".to_string()),
                    _ => Err("sentinel gave a malformed address".to_string()),
                }
            }
            (Step::Subscribing, Value::Array(a)) if is(&a, 0, "subscribe") => {
                self.step = Step::Watching;
                Ok(Heard::Nothing)
            }
            (Step::Watching, Value::Array(a)) if is(&a, 0, "message") => {
                // "<master> <old ip> <old port> <new ip> <new port>"
                let text = match a.get(2) {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => return Ok(Heard::Nothing),
                };
                let f: Vec<&str> = text.split(' ').collect();
                match &f[..] {
                    [name, _, _, ip, port] if *name == self.spec.master => {
                        match port.parse::<u16>() {
                            Ok(p) if p != 0 && !ip.is_empty() => {
                                Ok(Heard::Primary(ip.to_string(), p))
                            }
                            _ => Ok(Heard::Nothing),
                        }
                    }
                    _ => Ok(Heard::Nothing), // another master's failover
                }
            }
            (Step::Watching, Value::Array(a)) if is(&a, 0, "pong") => Ok(Heard::Pong),
            (_, other) => Err(format!("unexpected reply from a sentinel: {other:?}")),
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok().map(str::to_string),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn is(a: &[Value], i: usize, want: &str) -> bool {
    a.get(i)
        .and_then(text)
        .is_some_and(|t| t.eq_ignore_ascii_case(want))
}

fn address(h: &Value, p: &Value) -> Option<(String, u16)> {
    let host = text(h).filter(|h| !h.is_empty() && h.len() <= 255)?;
    let port = text(p)?.parse::<u16>().ok().filter(|p| *p != 0)?;
    Some((host, port))
}

/// Whether a `ROLE` reply says `master`: `Ok(())`, or what it said instead.
pub fn role_is_master(v: &Value) -> Result<(), String> {
    match v {
        Value::Array(a) if is(a, 0, "master") => Ok(()),
        Value::Array(a) => Err(format!(
            "not the primary (ROLE says {})",
            a.first().and_then(text).unwrap_or_else(|| "?".into())
        )),
        other => Err(format!("unexpected ROLE reply {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn watch() -> Sentinels {
        Sentinels::new(Sentinel {
            sentinels: vec![("a".into(), 1), ("b".into(), 2)],
            master: "m".into(),
        })
    }

    #[test]
    fn sentinels_are_asked_in_turn() {
        let mut s = watch();
        assert_eq!(s.pick(), ("a".into(), 1));
        assert_eq!(s.pick(), ("b".into(), 2));
        assert_eq!(s.pick(), ("a".into(), 1));
    }

    #[test]
    fn address_then_subscription_then_switches() {
        let mut s = watch();
        assert_eq!(s.on_up().len(), 2);
        assert_eq!(
            s.on_value(Value::Array(vec![bulk("10.0.0.1"), bulk("6380")])),
            Ok(Heard::Primary("10.0.0.1".into(), 6380))
        );
        let ack = Value::Array(vec![
            bulk("subscribe"),
            bulk("+switch-master"),
            Value::Int(1),
        ]);
        assert_eq!(s.on_value(ack), Ok(Heard::Nothing));
        let msg = |t: &str| Value::Array(vec![bulk("message"), bulk("+switch-master"), bulk(t)]);
        assert_eq!(
            s.on_value(msg("m 10.0.0.1 6380 10.0.0.2 6381")),
            Ok(Heard::Primary("10.0.0.2".into(), 6381))
        );
        assert_eq!(s.on_value(msg("other 1 2 3 4")), Ok(Heard::Nothing));
        assert_eq!(s.on_value(msg("m 1 2 3 notaport")), Ok(Heard::Nothing));
        assert_eq!(
            s.on_value(Value::Array(vec![bulk("pong"), bulk("")])),
            Ok(Heard::Pong)
        );
    }

    #[test]
    fn an_unknown_master_or_nonsense_fails_the_link() {
        let mut s = watch();
        s.on_up();
        assert!(s.on_value(Value::Nil).unwrap_err().contains("\"m\""));
        s.on_up();
        assert!(s.on_value(Value::Array(vec![bulk("h")])).is_err());
        s.on_up();
        assert!(s
            .on_value(Value::Array(vec![bulk("h"), bulk("0")]))
            .is_err());
        s.on_up();
        assert!(s.on_value(Value::Int(3)).is_err());
    }

    #[test]
    fn only_a_master_passes_the_role_check() {
        assert!(role_is_master(&Value::Array(vec![bulk("master"), Value::Int(0)])).is_ok());
        let e = role_is_master(&Value::Array(vec![bulk("slave"), bulk("h")])).unwrap_err();
        assert!(e.contains("slave"), "{e}");
        assert!(role_is_master(&Value::Okay).is_err());
    }
}
