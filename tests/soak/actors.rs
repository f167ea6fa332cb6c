//! The soak's cast: witnesses, publishers, churners, abusers, the readiness monitor,
//! and what they record.

use super::client::{client_frame, Client, Got};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const INSTANCES: usize = 3;
pub const CHANNELS: usize = 4;
/// The instance that is SIGTERMed and restarted.
pub const RESTARTED: usize = 2;
/// Before a breaking fault, messages sent this early may still be in an outbox.
pub const PRE_MARGIN: Duration = Duration::from_millis(500);
/// After every affected instance is ready again, messages still in flight settle.
pub const POST_MARGIN: Duration = Duration::from_millis(500);

/// (publisher id, sequence number).
pub type MsgId = (u32, u64);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    Witness,
    Publisher,
    Churn { with_close: bool },
}

/// One client connection's view.
pub struct Record {
    pub role: Role,
    pub instance: usize,
    /// Instance start count when it connected (a restart makes a new generation).
    pub generation: u64,
    pub channel: usize,
    pub joined: Instant,
    /// When it started leaving (None: stayed until the end or its instance went away).
    pub leaving: Option<Instant>,
    /// Its instance went away under it (restart): completeness is not checked.
    pub cut: bool,
    pub got: Vec<(MsgId, Instant)>,
    /// Forged envelopes delivered to it (any is a violation).
    pub forged: u32,
}

/// A message sent: by whom, when, through which instance, on which channel.
pub struct Sent {
    pub at: Instant,
    pub instance: usize,
    pub channel: usize,
}

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    PauseShort,
    PauseLong,
    KillPubsub,
    /// Killed and restarted; its AOF keeps the data (history survives).
    RedisRestart,
    /// Killed, its data wiped, restarted: every channel's history begins again.
    RedisRestartEmpty,
    InstanceRestart,
}

pub struct Window {
    pub fault: Fault,
    pub start: Instant,
    pub end: Instant,
    /// `None`: every instance; `Some(i)`: only instance i.
    pub scope: Option<usize>,
}

impl Window {
    pub fn covers(&self, t: Instant, instances: [usize; 2]) -> bool {
        let scoped = self.scope.is_none_or(|i| instances.contains(&i));
        // With history, only a Redis that lost its data can lose messages (those it
        // held and had not delivered); a stopping instance loses what its clients send
        // after its close. Every other fault must lose nothing.
        let breaking = matches!(
            self.fault,
            Fault::RedisRestartEmpty | Fault::InstanceRestart
        );
        breaking && scoped && t + PRE_MARGIN >= self.start && t <= self.end
    }
}

pub struct World {
    pub addrs: Vec<SocketAddr>,
    /// The Redis everyone shares (the forger publishes there directly).
    pub redis_port: u16,
    pub generations: Vec<AtomicU64>,
    pub stop: AtomicBool,
    /// Stops churn and abusers a little before the end (so the final state is quiet).
    pub stop_churn: AtomicBool,
    /// Publishers stop first; readers stop a little later.
    pub stop_publishing: AtomicBool,
    pub records: Mutex<Vec<Record>>,
    pub sent: Mutex<HashMap<MsgId, Sent>>,
}

pub fn parse_msg(p: &[u8]) -> Option<MsgId> {
    let s = std::str::from_utf8(p).ok()?;
    let (id, rest) = s.strip_prefix('P')?.split_once(':')?;
    let seq = rest.split(' ').next()?;
    Some((id.parse().ok()?, seq.parse().ok()?))
}

#[derive(PartialEq, Eq)]
pub enum Ended {
    /// `until` said stop.
    Stopped,
    /// The server sent its close frame.
    Closed,
    /// The connection went without one.
    Gone,
}

/// Reads until `until` says stop or the connection ends; records every message.
fn read_into(
    c: &mut Client,
    rec: &mut Record,
    answer_pings: bool,
    until: impl Fn() -> bool,
) -> Ended {
    loop {
        if until() {
            return Ended::Stopped;
        }
        match c.next() {
            Got::Frame(1, p) => {
                if let Some(id) = parse_msg(&p) {
                    rec.got.push((id, Instant::now()));
                } else if p.starts_with(FORGED) {
                    rec.forged += 1;
                }
            }
            Got::Frame(9, p) if answer_pings => {
                let _ = c.send(0xA, &p);
            }
            Got::Frame(8, _) => return Ended::Closed,
            Got::Gone => return Ended::Gone,
            _ => {}
        }
    }
}

impl Record {
    pub fn new(role: Role, instance: usize, generation: u64, channel: usize) -> Record {
        Record {
            role,
            instance,
            generation,
            channel,
            joined: Instant::now(),
            leaving: None,
            cut: false,
            got: Vec::new(),
            forged: 0,
        }
    }
}

/// Stopped by a flag: the last second is not held against it (messages in flight).
/// Otherwise the connection went under it (its instance restarted).
fn finish(rec: &mut Record, ended: Ended) {
    match ended {
        Ended::Stopped => rec.leaving = Some(Instant::now() - Duration::from_secs(1)),
        _ => rec.cut = true,
    }
}

pub fn witness(w: Arc<World>, instance: usize, channel: usize) {
    while !w.stop.load(Ordering::SeqCst) {
        let generation = w.generations[instance].load(Ordering::SeqCst);
        let Some(mut c) = Client::connect(w.addrs[instance], &format!("/ws/soak{channel}")) else {
            std::thread::sleep(Duration::from_millis(50)); // instance restarting: retry
            continue;
        };
        let mut rec = Record::new(Role::Witness, instance, generation, channel);
        let ended = read_into(&mut c, &mut rec, true, || w.stop.load(Ordering::SeqCst));
        finish(&mut rec, ended);
        w.records.lock().unwrap().push(rec);
    }
}

pub fn publisher(w: Arc<World>, id: u32, instance: usize, channel: usize, per_sec: f64) {
    let mut seq = 0u64;
    let period = Duration::from_secs_f64(1.0 / per_sec);
    let pad = "x".repeat(if per_sec >= 100.0 {
        1000
    } else {
        40 + (id as usize * 37) % 200
    });
    while !w.stop_publishing.load(Ordering::SeqCst) {
        let generation = w.generations[instance].load(Ordering::SeqCst);
        let Some(c) = Client::connect(w.addrs[instance], &format!("/ws/soak{channel}")) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        // The publisher reads what it gets too (everyone on a channel does).
        let mut reader = Client {
            s: c.s.try_clone().unwrap(),
            buf: c.buf,
        };
        let mut out = c.s;
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let ww = w.clone();
        let reading = std::thread::spawn(move || {
            let mut rec = Record::new(Role::Publisher, instance, generation, channel);
            let ended = read_into(&mut reader, &mut rec, false, || d.load(Ordering::SeqCst));
            finish(&mut rec, ended);
            ww.records.lock().unwrap().push(rec);
        });
        let mut next = Instant::now();
        while !w.stop_publishing.load(Ordering::SeqCst) && !reading.is_finished() {
            let at = Instant::now();
            let text = format!("P{id}:{seq} {pad}");
            if out.write_all(&client_frame(1, text.as_bytes())).is_err() {
                break;
            }
            w.sent.lock().unwrap().insert(
                (id, seq),
                Sent {
                    at,
                    instance,
                    channel,
                },
            );
            seq += 1;
            next += period;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        // Stop sending, then read on until everything sent had time to come back.
        let settle = Instant::now() + Duration::from_secs(2);
        while !reading.is_finished() && Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(20));
        }
        done.store(true, Ordering::SeqCst);
        let _ = reading.join();
    }
}

/// Joins a random channel on a random instance for a short while, again and again.
pub fn churner(w: Arc<World>, seed: u64) {
    let mut rng = seed;
    let mut rand = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    while !w.stop_churn.load(Ordering::SeqCst) {
        let instance = rand(INSTANCES as u64) as usize;
        let channel = rand(CHANNELS as u64) as usize + if rand(3) == 0 { 10 } else { 0 };
        let generation = w.generations[instance].load(Ordering::SeqCst);
        let Some(mut c) = Client::connect(w.addrs[instance], &format!("/ws/soak{channel}")) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let with_close = rand(2) == 0;
        let mut rec = Record::new(Role::Churn { with_close }, instance, generation, channel);
        let stay = Instant::now() + Duration::from_millis(200 + rand(1800));
        if read_into(&mut c, &mut rec, true, || Instant::now() >= stay) != Ended::Stopped {
            rec.cut = true;
        } else if with_close {
            rec.leaving = Some(Instant::now());
            // Read on until the server's close: everything fanned out before it
            // processed ours must arrive first.
            let deadline = Instant::now() + Duration::from_secs(5);
            rec.cut = !c.send(8, &1000u16.to_be_bytes())
                || read_into(&mut c, &mut rec, true, || Instant::now() >= deadline)
                    != Ended::Closed;
        } else {
            rec.leaving = Some(Instant::now());
            c.kill();
        }
        w.records.lock().unwrap().push(rec);
    }
}

/// What forged envelopes carry: never to be delivered.
pub const FORGED: &[u8] = b"FORGED";

/// A foreign publisher with only PUBLISH rights, through every fault: envelopes with an
/// epoch nobody confirmed, and with the channel's real epoch (read from its meta hash)
/// and offsets far ahead, on every soak channel, ~400/s.
pub fn forger(w: Arc<World>) {
    let mut n = 0u64;
    while !w.stop_churn.load(Ordering::SeqCst) {
        let conn = redis::Client::open(format!("redis://127.0.0.1:{}/", w.redis_port))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)));
        let Ok(mut r) = conn else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let _ = r.set_read_timeout(Some(Duration::from_secs(1)));
        while !w.stop_churn.load(Ordering::SeqCst) {
            let mut p = redis::pipe();
            for ch in 0..4 {
                let name = format!("soak{ch}");
                let (meta, _) = wsfan::backplane::redis::history::keys(&name);
                let real: redis::RedisResult<(Option<String>, Option<u64>)> = redis::cmd("HMGET")
                    .arg(&meta)
                    .arg("e")
                    .arg("s")
                    .query(&mut r);
                n += 1;
                p.cmd("PUBLISH")
                    .arg(&name)
                    .arg(format!("\0h{}:f{n}:FORGED {n}", 1 + n % 5))
                    .ignore();
                if let Ok((Some(e), Some(top))) = real {
                    p.cmd("PUBLISH")
                        .arg(&name)
                        .arg(format!("\0h{}:{e}:FORGED {n}", top + 100_000 + n))
                        .ignore();
                }
            }
            if p.query::<()>(&mut r).is_err() {
                break; // Redis restarting: connect again
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Ping flooders that never read, a few seconds each: cut by the rate limit (the
/// instances' disconnect counters show it).
pub fn abuser(w: Arc<World>) {
    let mut round = 0usize;
    while !w.stop_churn.load(Ordering::SeqCst) {
        let instance = round % INSTANCES;
        round += 1;
        if let Some(c) = Client::connect(w.addrs[instance], "/ws/quiet") {
            let mut s = c.s;
            s.set_write_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let batch = client_frame(9, b"are you there").repeat(200);
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                match s.write(&batch) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        }
    }
}

/// A client that never reads the busiest channel, one after another: once the kernel's
/// send buffer for it is full (loopback autotunes it to a few MB: ~20 s at 200 KB/s)
/// and its queue reaches the cap, it is cut as a slow consumer. Unsolicited pongs keep
/// it clear of the keepalive cut.
pub fn deaf(w: Arc<World>) {
    let mut round = 0usize;
    while !w.stop_churn.load(Ordering::SeqCst) {
        let instance = round % INSTANCES;
        round += 1;
        let Some(mut c) = Client::connect_with(w.addrs[instance], "/ws/soak0", Some(4096)) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let end = Instant::now() + Duration::from_secs(40);
        while Instant::now() < end && !w.stop_churn.load(Ordering::SeqCst) && c.send(0xA, b"") {
            std::thread::sleep(Duration::from_millis(200));
        }
        c.kill();
    }
}

/// Watches `/readyz` of every instance every 50 ms: the outage windows as operators
/// would see them, (instance, from, to).
pub fn monitor(w: Arc<World>, out: Arc<Mutex<Vec<(usize, Instant, Instant)>>>) {
    let mut down: Vec<Option<Instant>> = vec![None; INSTANCES];
    while !w.stop.load(Ordering::SeqCst) {
        for (i, since) in down.iter_mut().enumerate() {
            let addr = w.addrs[i];
            let ok =
                TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok_and(|mut s| {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = s
                        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                    let mut b = [0u8; 12];
                    s.read_exact(&mut b).is_ok() && &b[9..12] == b"200"
                });
            match (ok, *since) {
                (false, None) => *since = Some(Instant::now()),
                (true, Some(t)) => {
                    out.lock().unwrap().push((i, t, Instant::now()));
                    *since = None;
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// No reconnect may happen while no fault is injected.
pub fn quiet_check(from: &(Instant, Vec<f64>), now: &[f64], violations: &mut Vec<String>) {
    for (i, (a, b)) in from.1.iter().zip(now).enumerate() {
        if a != b {
            violations.push(format!(
                "instance {i}: {} reconnects in a quiet period of {:.1} s",
                b - a,
                from.0.elapsed().as_secs_f64()
            ));
        }
    }
}

pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}
