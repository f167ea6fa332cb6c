//! Centrifugo's protocol (`/connection/websocket`): a recovery storm (many clients
//! reconnecting together, each recovering the same missed messages), the server's CPU
//! per delivery of protocol pushes against plain frames, and RSS per idle protocol
//! client with one subscription. Clients are blocking tungstenite sockets, one thread
//! each (small stacks).

use crate::common::{self, connect, Ws};
use crate::{proc_cpu, start_wsfan};
use std::time::{Duration, Instant};
use tungstenite::Message;
use wsfan::backplane::redis::history::{self, History};

fn text(ws: &mut Ws) -> String {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return t.to_string(),
            Ok(_) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Connects and subscribes `channel`; returns the socket and the subscribe reply.
fn subscriber(url: &str, channel: &str, recover: Option<(&str, u64)>) -> (Ws, serde_json::Value) {
    let mut ws = connect(url);
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    ws.send(Message::text(r#"{"id":1,"connect":{}}"#))
        .expect("send");
    text(&mut ws);
    let sub = match recover {
        Some((epoch, offset)) => format!(
            r#"{{"id":2,"subscribe":{{"channel":"{channel}","recover":true,"epoch":"{epoch}","offset":{offset}}}}}"#
        ),
        None => format!(r#"{{"id":2,"subscribe":{{"channel":"{channel}"}}}}"#),
    };
    ws.send(Message::text(sub)).expect("send");
    let reply: serde_json::Value = serde_json::from_str(&text(&mut ws)).expect("reply");
    (ws, reply)
}

/// Publishes `n` 64-byte messages on `channel` straight into Redis (the history script).
fn publish(redis: &common::Redis, channel: &str, n: usize) {
    let mut r = redis.conn();
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(history::publish_script())
        .query(&mut r)
        .expect("load");
    let h = History {
        size: 10_000,
        ttl: 300,
        instance: format!("bench{}", std::process::id()),
        max_entry: 65_538,
        key: None,
        node: String::new(),
        node2: String::new(),
        myid: String::new(),
    };
    let body = format!("{{\"m\":\"{}\"}}", "x".repeat(54));
    let mut done = 0;
    while done < n {
        let k = (n - done).min(64);
        let items: Vec<(u64, &[u8])> = (0..k)
            .map(|i| ((done + i + 1) as u64, body.as_bytes()))
            .collect();
        let _: Vec<(u64, u64)> = h
            .publish(&sha, channel, (done + k) as u64, &items)
            .query(&mut r)
            .expect("publish");
        done += k;
    }
}

/// `clients` protocol clients reconnect together, each recovering `missed` messages:
/// the time until the last has them all, and the history reads it took.
pub fn recovery_storm(clients: usize, missed: usize) {
    let redis = common::Redis::start();
    let a = start_wsfan(&["--redis", &redis.url()]);
    common::eventually(15.0, "ready", || a.status("/readyz") == 200);
    let url = a.url("/connection/websocket");
    let (ws, reply) = subscriber(&url, "storm", None);
    let epoch = reply["subscribe"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    let from = reply["subscribe"]["offset"].as_u64().expect("offset");
    drop(ws);
    publish(&redis, "storm", missed);
    let reads0 = a.metric("wsfan_history_reads_total");
    let cpu0 = proc_cpu(a.child.id());
    let t = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (url, epoch) = (url.clone(), epoch.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let (_ws, reply) = subscriber(&url, "storm", Some((&epoch, from)));
                    let s = &reply["subscribe"];
                    assert_eq!(s["recovered"], true, "{reply}");
                    let n = s["publications"].as_array().map_or(0, Vec::len);
                    assert_eq!(n, missed);
                    t.elapsed()
                })
                .expect("thread")
        })
        .collect();
    let last = threads
        .into_iter()
        .map(|h| h.join().expect("client"))
        .max()
        .unwrap_or_default();
    report!(
        "protocol: {clients} clients reconnect together and each recovers {missed} messages: the last has them all after {:.0} ms; wsfan CPU {:.0} ms; {} history reads",
        last.as_secs_f64() * 1000.0,
        (proc_cpu(a.child.id()) - cpu0) as f64 / 1e6,
        a.metric("wsfan_history_reads_total") - reads0
    );
}

/// Server CPU per delivery, `clients` on one channel, `messages` published into Redis:
/// plain frames against protocol pushes, and RSS per idle client of each kind.
pub fn pushes_vs_plain(clients: usize, messages: usize) {
    let redis = common::Redis::start();
    for (round, proto) in [false, true, false, true].into_iter().enumerate() {
        // A fresh instance each round: RSS grows from its own start.
        let a = start_wsfan(&["--redis", &redis.url()]);
        common::eventually(15.0, "ready", || a.status("/readyz") == 200);
        let channel = format!("cpu{round}");
        let rss0 = a.rss_kb();
        let mut socks: Vec<Ws> = (0..clients)
            .map(|_| {
                if proto {
                    subscriber(&a.url("/connection/websocket"), &channel, None).0
                } else {
                    let mut ws = connect(&a.url(&format!("/ws/{channel}")));
                    ws.get_mut()
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .expect("timeout");
                    ws
                }
            })
            .collect();
        let rss = (a.rss_kb().saturating_sub(rss0)) as f64 * 1024.0 / clients as f64;
        let cpu0 = proc_cpu(a.child.id());
        let readers: Vec<_> = socks
            .drain(..)
            .map(|mut ws| {
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        for _ in 0..messages {
                            text(&mut ws);
                        }
                    })
                    .expect("thread")
            })
            .collect();
        publish(&redis, &channel, messages);
        for r in readers {
            r.join().expect("reader");
        }
        let per = (proc_cpu(a.child.id()) - cpu0) as f64 / 1e3 / (clients * messages) as f64;
        report!(
            "protocol: {} x {clients} clients, {messages} messages: wsfan CPU {per:.2} us per delivery; RSS {rss:.0} bytes per idle client (one subscription)",
            if proto { "Centrifugo pushes" } else { "plain frames     " }
        );
    }
}
