//! One Redis link's life, sans-IO: down → connecting → handshaking → up → (failed) down,
//! with the connect and handshake deadlines, the PING deadline and the reconnect
//! backoff. Driven by `on_*(…, now)` calls and `on_timer(now)`, which says what is due;
//! the I/O shell (`RedisLink`) does the connecting, sending and reading.

use redis::Value;
use std::time::{Duration, Instant};

/// First reconnect delay; doubles per failed attempt up to `--redis-backoff-max`.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// A PING unanswered for longer than this makes the link "late": `/readyz` says not
/// ready (the link is declared dead only at `--redis-timeout`). A live Redis answers in
/// microseconds.
pub const PING_LATE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not connected; the next attempt is due at `retry_at`.
    Down,
    /// Looking up the host name or connecting, until `deadline`.
    Connecting,
    /// TCP is connected, login commands and a PING are sent; up once they are all
    /// answered. (A connect to a frozen or overloaded Redis succeeds in the kernel's
    /// backlog: only a reply proves the link usable.)
    Handshaking,
    /// Proven by a round trip: Pub/Sub and publishes flow.
    Up,
}

/// What `on_timer` says is due.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    Nothing,
    /// Start a connect attempt (then call `on_connecting`).
    Connect,
    /// Give up on this connection (then call `on_failed`).
    Fail(&'static str),
    /// Send a PING (already recorded as sent).
    Ping,
}

/// The timing settings of a link.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ping_interval: Duration,
    /// Connect, handshake and PING deadline (`--redis-timeout`).
    pub timeout: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug)]
pub struct Health {
    pub phase: Phase,
    timing: Timing,
    retry_at: Instant,
    deadline: Option<Instant>,
    /// Failed attempts since the link last proved healthy (drives the backoff).
    failures: u32,
    next_ping: Instant,
    ping_sent: Option<Instant>,
    /// Handshake replies still to come (login commands + PING).
    handshake_left: u32,
    /// The link has been up before (a new up is a reconnect).
    ever_up: bool,
    /// Last failure logged (its text, when) and identical ones not logged since.
    last_failure: Option<(String, Instant)>,
    unlogged: u32,
}

impl Health {
    pub fn new(timing: Timing, now: Instant) -> Health {
        Health {
            phase: Phase::Down,
            timing,
            retry_at: now,
            deadline: None,
            failures: 0,
            next_ping: now,
            ping_sent: None,
            handshake_left: 0,
            ever_up: false,
            last_failure: None,
            unlogged: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.phase == Phase::Up
    }

    /// TCP (or Unix) connected: bytes may be written and read.
    pub fn connected(&self) -> bool {
        matches!(self.phase, Phase::Handshaking | Phase::Up)
    }

    /// What is due now. A PING that is due is recorded as sent.
    pub fn on_timer(&mut self, now: Instant) -> Due {
        match self.phase {
            Phase::Down if now >= self.retry_at => Due::Connect,
            Phase::Connecting if self.deadline.is_some_and(|d| now >= d) => {
                Due::Fail("connect timed out")
            }
            Phase::Handshaking if self.deadline.is_some_and(|d| now >= d) => {
                Due::Fail("connected, but no reply to login/PING in time")
            }
            Phase::Up => {
                if self
                    .ping_sent
                    .is_some_and(|t| now >= t + self.timing.timeout)
                {
                    return Due::Fail("PING unanswered");
                }
                if self.ping_sent.is_none() && now >= self.next_ping {
                    self.ping_sent = Some(now);
                    self.next_ping = now + self.timing.ping_interval;
                    return Due::Ping;
                }
                Due::Nothing
            }
            _ => Due::Nothing,
        }
    }

    /// When `on_timer` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Down => Some(self.retry_at),
            Phase::Connecting | Phase::Handshaking => self.deadline,
            Phase::Up => Some(
                self.ping_sent
                    .map_or(self.next_ping, |t| t + self.timing.timeout),
            ),
        }
    }

    pub fn on_connecting(&mut self, now: Instant) {
        self.phase = Phase::Connecting;
        self.deadline = Some(now + self.timing.timeout);
    }

    /// TCP is connected and `login` commands plus one PING were sent.
    pub fn on_connected(&mut self, login: usize, now: Instant) {
        self.phase = Phase::Handshaking;
        self.deadline = Some(now + self.timing.timeout);
        self.handshake_left = login as u32 + 1;
    }

    /// A reply during the handshake: `Ok(true)` when it was the last (the link is up).
    /// Any error ends the attempt: wrong password, `-ERR max clients`, not Redis.
    pub fn on_handshake_reply(&mut self, v: &Value, now: Instant) -> Result<bool, String> {
        match v {
            Value::ServerError(e) => return Err(format!("login refused: {e:?}")),
            Value::Okay | Value::SimpleString(_) => {}
            other => return Err(format!("unexpected handshake reply {other:?}")),
        }
        self.handshake_left = self.handshake_left.saturating_sub(1);
        if self.handshake_left > 0 {
            return Ok(false);
        }
        self.phase = Phase::Up;
        self.deadline = None;
        self.next_ping = now + self.timing.ping_interval;
        Ok(true)
    }

    /// Whether the up that just happened is a reconnect (the link was up before).
    pub fn take_reconnect(&mut self) -> bool {
        std::mem::replace(&mut self.ever_up, true)
    }

    /// A periodic PING was answered: the link has held for a PING interval with round
    /// trips, so its reconnect backoff starts from the bottom again.
    pub fn on_pong(&mut self) {
        self.ping_sent = None;
        self.failures = 0;
    }

    /// The connection failed or was dropped. Returns whether it had been up and how long
    /// until the next attempt (exponential backoff with "equal jitter": between half the
    /// step and the step; `jitter` in 0..1).
    pub fn on_failed(&mut self, now: Instant, jitter: f64) -> (bool, Duration) {
        let was_up = self.phase == Phase::Up;
        let exp = BACKOFF_START.saturating_mul(1u32 << self.failures.min(16));
        let step = exp.min(self.timing.backoff_max);
        let wait = step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        self.retry_at = now + wait;
        self.failures = self.failures.saturating_add(1);
        self.phase = Phase::Down;
        self.deadline = None;
        self.ping_sent = None;
        self.handshake_left = 0;
        if was_up {
            self.last_failure = None;
        }
        (was_up, wait)
    }

    /// Not connected, and nothing to connect to yet: the next attempt waits until `at`
    /// (no failure counted).
    pub fn wait_until(&mut self, at: Instant) {
        self.phase = Phase::Down;
        self.deadline = None;
        self.retry_at = at;
    }

    /// The next attempt is due now (a new address to try: no backoff to wait out).
    /// A link that is not down is left alone.
    pub fn retry_now(&mut self, now: Instant) {
        if self.phase == Phase::Down {
            self.retry_at = now;
        }
    }

    /// Failed attempts since the link last proved healthy.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a failure with this text should be logged now; identical ones within
    /// `every` are only counted, and the count comes back with the next one logged.
    pub fn log_failure(&mut self, why: &str, now: Instant, every: Duration) -> Option<u32> {
        if let Some((last, at)) = &self.last_failure {
            if last == why && now.saturating_duration_since(*at) < every {
                self.unlogged += 1;
                return None;
            }
        }
        self.last_failure = Some((why.to_string(), now));
        Some(std::mem::take(&mut self.unlogged))
    }

    /// A PING has waited longer than `PING_LATE`.
    pub fn ping_late(&self, now: Instant) -> bool {
        self.ping_sent
            .is_some_and(|t| now.saturating_duration_since(t) > PING_LATE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        ping_interval: Duration::from_secs(3),
        timeout: Duration::from_secs(5),
        backoff_max: Duration::from_secs(5),
    };

    fn up(now: Instant, login: usize) -> Health {
        let mut h = Health::new(T, now);
        assert_eq!(h.on_timer(now), Due::Connect);
        h.on_connecting(now);
        h.on_connected(login, now);
        for i in 0..login {
            assert_eq!(h.on_handshake_reply(&Value::Okay, now), Ok(false), "{i}");
        }
        assert_eq!(
            h.on_handshake_reply(&Value::SimpleString("PONG".into()), now),
            Ok(true)
        );
        h
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn up_only_after_every_handshake_reply() {
        let t0 = Instant::now();
        let h = up(t0, 2);
        assert!(h.is_up());
        let mut h = Health::new(T, t0);
        h.on_connecting(t0);
        assert!(!h.connected());
        h.on_connected(0, t0);
        assert!(h.connected() && !h.is_up());
        // Silence: the handshake deadline fails it.
        assert_eq!(h.on_timer(t0 + secs(4.9)), Due::Nothing);
        assert!(matches!(h.on_timer(t0 + secs(5.0)), Due::Fail(_)));
    }

    #[test]
    fn every_handshake_reply_that_is_not_ok_fails_the_attempt() {
        let t0 = Instant::now();
        let err = redis::parse_redis_value(b"-ERR nope\r\n").expect("an error reply");
        for bad in [
            err,
            Value::Int(1),
            Value::Nil,
            Value::Array(vec![Value::BulkString(b"pong".to_vec())]),
            Value::BulkString(b"PONG".to_vec()),
        ] {
            let mut h = Health::new(T, t0);
            h.on_connecting(t0);
            h.on_connected(1, t0);
            assert!(h.on_handshake_reply(&bad, t0).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pings_are_due_each_interval_and_silence_fails_the_link() {
        let t0 = Instant::now();
        let mut h = up(t0, 0);
        assert_eq!(h.on_timer(t0 + secs(2.9)), Due::Nothing);
        assert_eq!(h.on_timer(t0 + secs(3.0)), Due::Ping);
        assert_eq!(h.on_timer(t0 + secs(3.1)), Due::Nothing, "one in flight");
        assert!(!h.ping_late(t0 + secs(3.9)));
        assert!(h.ping_late(t0 + secs(4.1)), "late after a second");
        h.on_pong();
        assert!(!h.ping_late(t0 + secs(5.0)));
        assert_eq!(h.on_timer(t0 + secs(6.0)), Due::Ping);
        assert_eq!(h.on_timer(t0 + secs(10.9)), Due::Nothing);
        assert_eq!(h.on_timer(t0 + secs(11.0)), Due::Fail("PING unanswered"));
    }

    #[test]
    fn backoff_grows_until_a_periodic_pong_and_not_at_connect() {
        let t0 = Instant::now();
        let mut h = Health::new(T, t0);
        let mut waits = Vec::new();
        for _ in 0..8 {
            h.on_connecting(t0);
            h.on_connected(0, t0); // TCP connected: no reset
            let (was_up, wait) = h.on_failed(t0, 1.0);
            assert!(!was_up);
            waits.push(wait.as_millis());
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        // Up (handshake answered) still keeps the count...
        let mut h2 = up(t0, 0);
        h2.on_failed(t0, 1.0);
        h2.on_connecting(t0);
        h2.on_connected(0, t0);
        h2.on_handshake_reply(&Value::SimpleString("PONG".into()), t0)
            .unwrap();
        assert_eq!(h2.failures(), 1);
        // ...until a periodic PING is answered.
        assert_eq!(h2.on_timer(t0 + secs(3.0)), Due::Ping);
        h2.on_pong();
        assert_eq!(h2.failures(), 0);
        let (was_up, wait) = h2.on_failed(t0, 0.0);
        assert!(was_up);
        assert_eq!(wait.as_millis(), 50, "half the first step with jitter 0");
    }

    #[test]
    fn identical_failures_are_logged_once_per_interval_with_a_count() {
        let t0 = Instant::now();
        let mut h = Health::new(T, t0);
        let every = secs(30.0);
        assert_eq!(h.log_failure("refused", t0, every), Some(0));
        assert_eq!(h.log_failure("refused", t0 + secs(1.0), every), None);
        assert_eq!(h.log_failure("refused", t0 + secs(2.0), every), None);
        assert_eq!(h.log_failure("other", t0 + secs(3.0), every), Some(2));
        assert_eq!(h.log_failure("other", t0 + secs(40.0), every), Some(0));
    }

    #[test]
    fn reconnects_are_counted_from_the_second_up() {
        let t0 = Instant::now();
        let mut h = up(t0, 0);
        assert!(!h.take_reconnect());
        assert!(h.take_reconnect());
    }
}
