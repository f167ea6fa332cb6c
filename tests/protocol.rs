//! Centrifugo's client protocol on `/connection/websocket` (issue 17, first part): the
//! official `centrifuge` SDK (npm, pinned in `tests/sdk/package.json`, run by Node)
//! connects, subscribes with recovery, publishes and receives; its instance is
//! SIGKILLed mid-stream and it recovers on the other instance behind the same
//! `--reuse-port` port: every message once, in order, `recovered: true`. Plus bad
//! protocol input from a raw WebSocket client.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// The SDK in a Node child: its events as JSON values, its stdin to publish.
struct Sdk {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Sdk {
    fn start(url: &str, channel: &str) -> Sdk {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk");
        // Once per test binary: tests run in parallel, and two `npm ci` in one folder
        // would pull node_modules from under each other.
        static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
        INSTALLED.get_or_init(|| {
            if !std::path::Path::new(&format!("{dir}/node_modules/centrifuge")).exists() {
                let ok = Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund", "--silent"])
                    .current_dir(dir)
                    .status()
                    .expect("npm must be installed (see README)");
                assert!(ok.success(), "npm ci in tests/sdk failed");
            }
        });
        let mut child = Command::new("node")
            .arg(format!("{dir}/follow.mjs"))
            .args([url, channel])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node must be installed (see README)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Sdk {
            stdin: child.stdin.take(),
            child,
            events,
            seen: Vec::new(),
        }
    }

    /// Waits (at most `secs`) until an event satisfies `pred`; returns it.
    fn wait(
        &mut self,
        secs: f64,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!("timed out waiting for {what}; saw {:?}", self.seen),
            }
        }
    }

    fn publish(&mut self, data: &serde_json::Value) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{data}").expect("write to node");
    }

    /// The `data` of every publication seen so far.
    fn pubs(&self) -> Vec<serde_json::Value> {
        self.seen
            .iter()
            .filter(|e| e["event"] == "pub")
            .map(|e| e["data"].clone())
            .collect()
    }
}

impl Drop for Sdk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn instance_on(redis: &Redis, port: u16) -> Wsfan {
    let url = redis.url();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--redis",
        url.as_str(),
        "--listen",
        listen.as_str(),
        "--reuse-port",
    ];
    args.extend_from_slice(FAST_FAILOVER);
    let s = Wsfan::start(&args);
    eventually(10.0, "instance ready", || s.status("/readyz") == 200);
    s
}

/// The SDK follows a channel across the death of its instance: every message, once, in
/// order, `recovered: true`; its own publishes and a plain client's arrive too.
#[test]
fn the_sdk_recovers_everything_on_another_instance_after_its_own_is_killed() {
    let redis = Redis::start();
    let port = free_port();
    // A alone first, so the SDK lands on A; B then shares the port (`--reuse-port`) and
    // is the only one left when A dies.
    let mut a = instance_on(&redis, port);
    let url = format!("ws://127.0.0.1:{port}/connection/websocket");
    let mut sdk = Sdk::start(&url, "room");
    let first = sdk.wait(10.0, "subscribed", |e| e["event"] == "subscribed");
    let _b = instance_on(&redis, port);
    assert_eq!(first["recovered"], false);
    // A plain client publishes through whichever instance it lands on; the SDK too.
    sdk.publish(&serde_json::json!({"n": 0, "from": "sdk"}));
    sdk.wait(5.0, "own publish", |e| {
        e["event"] == "pub" && e["data"]["from"] == "sdk"
    });
    // Another client keeps publishing: a plain WebSocket client on the same port (on A
    // or on B), each message confirmed by its own echo; when its instance dies it
    // reconnects (to B) and goes on with the next number.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        let url = format!("ws://127.0.0.1:{port}/ws/room");
        std::thread::spawn(move || {
            let mut confirmed = Vec::new();
            let mut n = 0u64;
            let end = Instant::now() + Duration::from_secs(30);
            while (!stop.load(std::sync::atomic::Ordering::Relaxed) || confirmed.len() < 300)
                && Instant::now() < end
            {
                let Ok(mut ws) = try_connect(&url, &[]) else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                loop {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) && confirmed.len() >= 300 {
                        break;
                    }
                    n += 1;
                    let m = serde_json::json!({ "n": n }).to_string();
                    if ws.send(Message::text(m.clone())).is_err() {
                        break;
                    }
                    let echoed = loop {
                        match ws.read() {
                            Ok(Message::Text(t)) if t.as_str() == m => break true,
                            Ok(_) => {}
                            Err(_) => break false,
                        }
                    };
                    if !echoed {
                        break; // its instance died: reconnect, go on with n + 1
                    }
                    confirmed.push(n);
                    std::thread::sleep(Duration::from_millis(3));
                }
            }
            confirmed
        })
    };
    sdk.wait(10.0, "live messages", |e| {
        e["event"] == "pub" && e["data"]["n"] == 50
    });
    a.signal("KILL");
    a.wait_exit(5.0);
    let again = sdk.wait(15.0, "resubscribed", |e| {
        e["event"] == "subscribed" && e["wasRecovering"] == true
    });
    assert_eq!(again["recovered"], true, "{again}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let confirmed = publisher.join().expect("publisher");
    let last = *confirmed.last().expect("published");
    sdk.wait(15.0, "the last message", |e| {
        e["event"] == "pub" && e["data"]["n"] == last
    });
    let got: Vec<u64> = sdk
        .pubs()
        .iter()
        .filter_map(|d| d["n"].as_u64())
        .filter(|n| *n > 0)
        .collect();
    if !got.windows(2).all(|w| w[0] < w[1]) {
        let twice = |n: u64| got.iter().filter(|g| **g == n).count() > 1;
        let events: Vec<String> = sdk
            .seen
            .iter()
            .filter(|e| e["event"] != "pub" || e["data"]["n"].as_u64().is_some_and(twice))
            .map(|e| e.to_string())
            .collect();
        panic!("once, in order: {got:?}\nevents: {events:?}");
    }
    let missing: Vec<u64> = confirmed
        .iter()
        .copied()
        .filter(|n| got.binary_search(n).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "confirmed but never received: {missing:?}"
    );
}

/// Bad protocol input from a raw client: the protocol's error or close code, nothing
/// else touched.
#[test]
fn bad_protocol_input_gets_the_protocol_s_answer() {
    let a = Wsfan::start(&["--max-channels-per-connection", "2"]);
    let url = a.url("/connection/websocket");
    let mut bystander = connect(&a.url("/ws/fine"));
    let send = |ws: &mut Ws, s: &str| ws.send(Message::text(s)).expect("send");
    let reply = |ws: &mut Ws| -> serde_json::Value {
        serde_json::from_str(&recv_text(ws)).expect("a JSON reply")
    };
    // Not JSON, a command before connect, no id, a huge or negative id: closed 3501.
    for bad in [
        "not json",
        r#"{"id":1,"subscribe":{"channel":"x"}}"#,
        r#"{"connect":{}}"#,
        r#"{"id":99999999999,"connect":{}}"#,
        r#"{"id":-3,"connect":{}}"#,
    ] {
        let mut c = connect(&url);
        send(&mut c, bad);
        assert_eq!(expect_close(&mut c), 3501, "{bad}");
    }
    let mut c = connect(&url);
    send(&mut c, r#"{"id":1,"connect":{}}"#);
    assert!(reply(&mut c)["connect"]["client"].is_string());
    for (cmd, code) in [
        (r#"{"id":2,"rpc":{"data":1}}"#, 104),
        (r#"{"id":3,"subscribe":{}}"#, 107),
        (r#"{"id":4,"subscribe":{"channel":"bad channel!"}}"#, 102),
        (
            r#"{"id":5,"history":{"channel":"c","limit":1000000000}}"#,
            107,
        ),
        (r#"{"id":5,"history":{"channel":"c","limit":-1}}"#, 107),
    ] {
        send(&mut c, cmd);
        let r = reply(&mut c);
        assert_eq!(r["error"]["code"], code, "{cmd}: {r}");
    }
    send(&mut c, r#"{"id":6,"subscribe":{"channel":"one"}}"#);
    assert!(reply(&mut c)["subscribe"].is_object());
    send(&mut c, r#"{"id":7,"subscribe":{"channel":"one"}}"#);
    assert_eq!(
        reply(&mut c)["error"]["code"],
        105,
        "the same channel twice"
    );
    send(&mut c, r#"{"id":8,"subscribe":{"channel":"two"}}"#);
    assert!(reply(&mut c)["subscribe"].is_object());
    send(&mut c, r#"{"id":9,"subscribe":{"channel":"three"}}"#);
    assert_eq!(
        reply(&mut c)["error"]["code"],
        106,
        "more channels than allowed"
    );
    // A nesting bomb closes the connection.
    let bomb = format!(
        r#"{{"id":10,"publish":{{"channel":"one","data":{}}}}}"#,
        "[".repeat(10_000)
    );
    send(&mut c, &bomb);
    assert_eq!(expect_close(&mut c), 3501);
    send_text(&mut bystander, "still here");
    assert_eq!(recv_text(&mut bystander), "still here");
}

/// Across protocols and instances: a plain client's text (JSON or not) and binary on
/// instance B, and a protocol client's JSON on instance A, each reaches the other side
/// as documented.
#[test]
fn payloads_cross_between_plain_and_protocol_clients() {
    let redis = Redis::start();
    let start = || {
        let url = redis.url();
        let mut args = vec!["--redis", url.as_str()];
        args.extend_from_slice(FAST_FAILOVER);
        let s = Wsfan::start(&args);
        eventually(10.0, "instance ready", || s.status("/readyz") == 200);
        s
    };
    let (a, b) = (start(), start());
    let mut p = connect(&a.url("/connection/websocket"));
    let mut plain = connect(&b.url("/ws/mix"));
    let send = |ws: &mut Ws, s: &str| ws.send(Message::text(s)).expect("send");
    let reply = |ws: &mut Ws| -> serde_json::Value {
        serde_json::from_str(&recv_text(ws)).expect("a JSON reply")
    };
    send(&mut p, r#"{"id":1,"connect":{}}"#);
    reply(&mut p);
    send(&mut p, r#"{"id":2,"subscribe":{"channel":"mix"}}"#);
    assert!(reply(&mut p)["subscribe"].is_object());
    eventually(5.0, "both instances subscribed", || {
        redis.numsub("mix") == 2
    });
    send_text(&mut plain, r#"{"a":1}"#);
    send_text(&mut plain, "hello");
    plain.send(Message::binary(vec![0u8, 255])).expect("binary");
    let mut datas = Vec::new();
    for _ in 0..3 {
        let r = reply(&mut p);
        datas.push(r["push"]["pub"]["data"].clone());
        assert!(r["push"]["pub"]["offset"].as_u64().is_some(), "{r}");
    }
    assert_eq!(
        datas,
        [
            serde_json::json!({"a": 1}),
            serde_json::json!("hello"),
            serde_json::json!({"b64": "AP8="})
        ]
    );
    send(
        &mut p,
        r#"{"id":3,"publish":{"channel":"mix","data":{"x":[1,2]}}}"#,
    );
    send(
        &mut p,
        r#"{"id":4,"publish":{"channel":"mix","data":"plain words"}}"#,
    );
    let mut texts = Vec::new();
    while texts.len() < 5 {
        match recv(&mut plain) {
            Message::Text(t) => texts.push(t.to_string()),
            Message::Binary(_) => texts.push("binary".into()),
            _ => {}
        }
    }
    assert_eq!(texts[3], r#"{"x":[1,2]}"#);
    assert_eq!(
        texts[4], "plain words",
        "a JSON string is published as its text"
    );
}

/// Redis restarted without its data: the SDK is unsubscribed with "insufficient state",
/// subscribes again, is told `recovered: false`, and sees nothing twice or out of order;
/// what is published afterwards arrives.
#[test]
fn after_redis_lost_its_data_the_sdk_is_told_not_recovered() {
    let mut redis = Redis::start();
    let a = {
        let url = redis.url();
        let mut args = vec!["--redis", url.as_str()];
        args.extend_from_slice(FAST_FAILOVER);
        let s = Wsfan::start(&args);
        eventually(10.0, "instance ready", || s.status("/readyz") == 200);
        s
    };
    let mut sdk = Sdk::start(
        &a.url("/connection/websocket").replace("http", "ws"),
        "room",
    );
    sdk.wait(10.0, "subscribed", |e| e["event"] == "subscribed");
    for n in 1..=10 {
        sdk.publish(&serde_json::json!({ "n": n }));
    }
    sdk.wait(10.0, "10 messages", |e| {
        e["event"] == "pub" && e["data"]["n"] == 10
    });
    redis.kill();
    redis.restart();
    let again = sdk.wait(15.0, "subscribed again", |e| {
        e["event"] == "subscribed" && e["wasRecovering"] == true
    });
    assert_eq!(again["recovered"], false, "{again}");
    for n in 11..=20 {
        sdk.publish(&serde_json::json!({ "n": n }));
    }
    sdk.wait(10.0, "20 messages", |e| {
        e["event"] == "pub" && e["data"]["n"] == 20
    });
    let got: Vec<u64> = sdk.pubs().iter().filter_map(|d| d["n"].as_u64()).collect();
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "once, in order: {got:?}"
    );
    assert_eq!(&got[..10], (1..=10).collect::<Vec<_>>());
    assert_eq!(got.last(), Some(&20));
}

/// History expired while the SDK was away (its instance gone longer than
/// `--history-ttl`): recovered: false, then live messages.
#[test]
fn after_history_expired_the_sdk_is_told_not_recovered() {
    let redis = Redis::start();
    let port = free_port();
    let start = |redis: &Redis| {
        let url = redis.url();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec![
            "--redis",
            url.as_str(),
            "--listen",
            listen.as_str(),
            "--history-ttl",
            "1",
        ];
        args.extend_from_slice(FAST_FAILOVER);
        let s = Wsfan::start(&args);
        eventually(10.0, "instance ready", || s.status("/readyz") == 200);
        s
    };
    let mut a = start(&redis);
    let mut sdk = Sdk::start(
        &format!("ws://127.0.0.1:{port}/connection/websocket"),
        "room",
    );
    sdk.wait(10.0, "subscribed", |e| e["event"] == "subscribed");
    sdk.publish(&serde_json::json!({ "n": 1 }));
    sdk.wait(10.0, "one message", |e| {
        e["event"] == "pub" && e["data"]["n"] == 1
    });
    a.signal("KILL");
    a.wait_exit(5.0);
    let (meta, _) = wsfan::backplane::redis::history::keys("room");
    eventually(10.0, "history expired", || {
        let n: i64 = redis::cmd("EXISTS")
            .arg(&meta)
            .query(&mut redis.conn())
            .expect("EXISTS");
        n == 0
    });
    let _b = start(&redis);
    let again = sdk.wait(15.0, "subscribed again", |e| {
        e["event"] == "subscribed" && e["wasRecovering"] == true
    });
    assert_eq!(again["recovered"], false, "{again}");
    sdk.publish(&serde_json::json!({ "n": 2 }));
    sdk.wait(10.0, "live again", |e| {
        e["event"] == "pub" && e["data"]["n"] == 2
    });
    let got: Vec<u64> = sdk.pubs().iter().filter_map(|d| d["n"].as_u64()).collect();
    assert_eq!(got, [1, 2]);
}

/// With `--jwt-secret`: the token comes with `connect`; an expired one is refused (109),
/// a forged one (101); the `channels` claim limits subscribe and publish (103).
#[test]
fn the_connect_token_is_checked_and_its_channels_claim_limits_channels() {
    let a = Wsfan::start(&["--jwt-secret", "topsecret"]);
    let url = a.url("/connection/websocket");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let good = wsfan::jwt::sign(
        &format!(r#"{{"sub":"u1","exp":{exp},"channels":["room.*"]}}"#),
        "topsecret",
    );
    let expired = wsfan::jwt::sign(r#"{"sub":"u1","exp":1000}"#, "topsecret");
    let forged = wsfan::jwt::sign(r#"{"sub":"u1"}"#, "guess");
    let send = |ws: &mut Ws, s: &str| ws.send(Message::text(s)).expect("send");
    let reply = |ws: &mut Ws| -> serde_json::Value {
        serde_json::from_str(&recv_text(ws)).expect("a JSON reply")
    };
    for (token, code) in [(&expired, 109), (&forged, 101)] {
        let mut c = connect(&url);
        send(
            &mut c,
            &format!(r#"{{"id":1,"connect":{{"token":"{token}"}}}}"#),
        );
        assert_eq!(reply(&mut c)["error"]["code"], code);
    }
    let mut c = connect(&url);
    send(&mut c, r#"{"id":1,"connect":{}}"#);
    assert_eq!(reply(&mut c)["error"]["code"], 101, "a token is required");
    let mut c = connect(&url);
    send(
        &mut c,
        &format!(r#"{{"id":1,"connect":{{"token":"{good}"}}}}"#),
    );
    assert!(reply(&mut c)["connect"].is_object());
    send(&mut c, r#"{"id":2,"subscribe":{"channel":"lobby"}}"#);
    assert_eq!(reply(&mut c)["error"]["code"], 103);
    send(&mut c, r#"{"id":3,"publish":{"channel":"lobby","data":1}}"#);
    assert_eq!(reply(&mut c)["error"]["code"], 103);
    send(&mut c, r#"{"id":4,"subscribe":{"channel":"room.1"}}"#);
    assert!(reply(&mut c)["subscribe"].is_object());
    send(
        &mut c,
        r#"{"id":5,"publish":{"channel":"room.1","data":"hi"}}"#,
    );
    let mut got = [reply(&mut c), reply(&mut c)];
    got.sort_by_key(|v| v.get("id").is_some());
    assert_eq!(got[0]["push"]["pub"]["data"], "hi");
    assert!(got[1]["publish"].is_object());
}

/// A frame over `--max-message-size` is closed 1009 like any client's; many commands
/// in one frame past the limit close 3501; a subscribe storm is bounded by the channel
/// limit. Nothing else is touched.
#[test]
fn oversized_frames_and_subscribe_storms_are_bounded() {
    let a = Wsfan::start(&["--max-channels-per-connection", "16"]);
    let url = a.url("/connection/websocket");
    let mut bystander = connect(&a.url("/ws/fine"));
    let send = |ws: &mut Ws, s: &str| ws.send(Message::text(s)).expect("send");
    // A frame that announces 64 MiB is refused from its header, before its payload.
    let mut c = connect(&url);
    let mut header = vec![0x81u8, 0xFF];
    header.extend_from_slice(&(64u64 << 20).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    std::io::Write::write_all(c.get_mut(), &header).expect("header");
    assert_eq!(expect_close(&mut c), 1009);
    let mut c = connect(&url);
    send(&mut c, r#"{"id":1,"connect":{}}"#);
    recv_text(&mut c);
    let big = format!(
        r#"{{"id":2,"publish":{{"channel":"x","data":"{}"}}}}"#,
        "x".repeat(70_000)
    );
    let _ = c.send(Message::text(big));
    assert_eq!(expect_close(&mut c), 1009);
    let mut c = connect(&url);
    send(&mut c, r#"{"id":1,"connect":{}}"#);
    recv_text(&mut c);
    let storm: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"id":{},"subscribe":{{"channel":"s{i}"}}}}"#, i + 2))
        .collect();
    send(&mut c, &storm.join("\n"));
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..100 {
        let r: serde_json::Value = serde_json::from_str(&recv_text(&mut c)).expect("reply");
        if r["subscribe"].is_object() {
            ok += 1;
        } else if r["error"]["code"] == 106 {
            limited += 1;
        }
    }
    assert_eq!((ok, limited), (16, 84));
    assert_eq!(a.metric("wsfan_channels"), 17.0, "16 + the bystander's");
    let flood = "{}\n".repeat(200);
    send(&mut c, &flood);
    assert_eq!(expect_close(&mut c), 3501);
    send_text(&mut bystander, "still here");
    assert_eq!(recv_text(&mut bystander), "still here");
}

/// Standalone (history in memory) works the same: a client that went away recovers
/// what was published meanwhile; `history` answers from a position; a position from
/// another epoch is not recovered.
#[test]
fn standalone_recovery_and_history_work_the_same() {
    let a = Wsfan::start(&[]);
    let url = a.url("/connection/websocket");
    let send = |ws: &mut Ws, s: &str| ws.send(Message::text(s)).expect("send");
    let reply = |ws: &mut Ws| -> serde_json::Value {
        serde_json::from_str(&recv_text(ws)).expect("a JSON reply")
    };
    let mut c = connect(&url);
    send(&mut c, r#"{"id":1,"connect":{}}"#);
    reply(&mut c);
    send(
        &mut c,
        r#"{"id":2,"subscribe":{"channel":"mem","recoverable":true}}"#,
    );
    let s = reply(&mut c);
    let epoch = s["subscribe"]["epoch"]
        .as_str()
        .expect("an epoch")
        .to_string();
    assert!(!epoch.is_empty());
    send(
        &mut c,
        r#"{"id":3,"publish":{"channel":"mem","data":"one"}}"#,
    );
    let mut offset = 0;
    for _ in 0..2 {
        let r = reply(&mut c);
        if let Some(o) = r["push"]["pub"]["offset"].as_u64() {
            offset = o;
        }
    }
    assert_eq!(offset, 1);
    drop(c);
    let mut other = connect(&a.url("/ws/mem"));
    for m in ["two", "three"] {
        send_text(&mut other, m);
        assert_eq!(recv_text(&mut other), m);
    }
    let mut c = connect(&url);
    send(&mut c, r#"{"id":1,"connect":{}}"#);
    reply(&mut c);
    send(
        &mut c,
        &format!(
            r#"{{"id":2,"subscribe":{{"channel":"mem","recover":true,"epoch":"{epoch}","offset":1}}}}"#
        ),
    );
    let s = reply(&mut c);
    assert_eq!(s["subscribe"]["recovered"], true, "{s}");
    let pubs: Vec<_> = s["subscribe"]["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| (p["data"].clone(), p["offset"].as_u64()))
        .collect();
    assert_eq!(
        pubs,
        [
            (serde_json::json!("two"), Some(2)),
            (serde_json::json!("three"), Some(3))
        ]
    );
    send(
        &mut c,
        &format!(
            r#"{{"id":3,"history":{{"channel":"mem","limit":10,"since":{{"epoch":"{epoch}","offset":2}}}}}}"#
        ),
    );
    let h = reply(&mut c);
    assert_eq!(h["history"]["publications"][0]["data"], "three", "{h}");
    assert_eq!(h["history"]["offset"], 3);
    send(
        &mut c,
        r#"{"id":4,"subscribe":{"channel":"mem2","recover":true,"epoch":"zz","offset":5}}"#,
    );
    let s = reply(&mut c);
    assert_eq!(s["subscribe"]["recovered"], false, "another epoch: {s}");
    assert_eq!(s["subscribe"]["was_recovering"], true);
}

/// A connection whose connect token expires is closed with 3005 ("expired"; the SDK
/// reconnects with a fresh token), found by the keepalive sweep.
#[test]
fn a_connection_is_closed_when_its_token_expires() {
    let a = Wsfan::start(&["--jwt-secret", "topsecret", "--ping-interval", "0.3"]);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 2;
    let token = wsfan::jwt::sign(&format!(r#"{{"sub":"u1","exp":{exp}}}"#), "topsecret");
    let mut c = connect(&a.url("/connection/websocket"));
    c.send(Message::text(format!(
        r#"{{"id":1,"connect":{{"token":"{token}"}}}}"#
    )))
    .expect("send");
    let r: serde_json::Value = serde_json::from_str(&recv_text(&mut c)).expect("reply");
    assert!(r["connect"].is_object(), "{r}");
    // Server pings ({}) are answered until the token runs out.
    let code = loop {
        match c.read() {
            Ok(Message::Text(t)) if t.as_str() == "{}" => {
                c.send(Message::text("{}")).expect("pong");
            }
            Ok(Message::Close(Some(f))) => break u16::from(f.code),
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, 3005);
}

/// Each command costs a token like a message: 50 publishes in one frame are no way
/// around `--max-messages-burst` 10 (closed 1008, the first ones published).
#[test]
fn commands_in_one_frame_count_against_the_rate_limit() {
    let a = Wsfan::start(&["--max-messages-per-sec", "1", "--max-messages-burst", "10"]);
    let mut c = connect(&a.url("/connection/websocket"));
    c.send(Message::text(r#"{"id":1,"connect":{}}"#))
        .expect("send");
    recv_text(&mut c);
    let many: Vec<String> = (0..50)
        .map(|i| {
            format!(
                r#"{{"id":{},"publish":{{"channel":"r","data":{i}}}}}"#,
                i + 2
            )
        })
        .collect();
    c.send(Message::text(many.join("\n"))).expect("send");
    assert_eq!(expect_close(&mut c), 1008);
    assert_eq!(
        a.metric("wsfan_disconnects_total{reason=\"rate_limit\"}"),
        1.0
    );
    assert!(a.metric("wsfan_messages_received_total") <= 10.0);
}

/// A graceful shutdown tells protocol clients the protocol's way first: a disconnect
/// push (3001, reconnect), then the close frame.
#[test]
fn shutdown_sends_a_disconnect_push_before_closing() {
    let a = Wsfan::start(&[]);
    let mut c = connect(&a.url("/connection/websocket"));
    c.send(Message::text(r#"{"id":1,"connect":{}}"#))
        .expect("send");
    recv_text(&mut c);
    a.signal("TERM");
    let push: serde_json::Value = serde_json::from_str(&recv_text(&mut c)).expect("push");
    assert_eq!(push["push"]["disconnect"]["code"], 3001, "{push}");
    assert_eq!(expect_close(&mut c), 1001);
}

/// `history` as the SDK uses it, standalone and on Redis: from the start, the newest
/// (reverse), before and after a position, the top only; a trimmed position is 112.
#[test]
fn history_lists_from_the_start_the_newest_and_around_a_position() {
    let redis = Redis::start();
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str(), "--history-size", "8"];
    args.extend_from_slice(FAST_FAILOVER);
    let on_redis = Wsfan::start(&args);
    eventually(10.0, "instance ready", || on_redis.status("/readyz") == 200);
    let standalone = Wsfan::start(&["--history-size", "8"]);
    for a in [&standalone, &on_redis] {
        let mut c = connect(&a.url("/connection/websocket"));
        let send = |ws: &mut Ws, s: &str| ws.send(Message::text(s)).expect("send");
        // The reply to command `id` (pushes skipped).
        let reply = |ws: &mut Ws, id: u64| -> serde_json::Value {
            loop {
                let v: serde_json::Value =
                    serde_json::from_str(&recv_text(ws)).expect("a JSON reply");
                if v["id"] == id {
                    return v;
                }
            }
        };
        send(&mut c, r#"{"id":1,"connect":{}}"#);
        reply(&mut c, 1);
        send(&mut c, r#"{"id":2,"subscribe":{"channel":"h"}}"#);
        let epoch = reply(&mut c, 2)["subscribe"]["epoch"]
            .as_str()
            .expect("epoch")
            .to_string();
        for n in 1..=12u64 {
            send(
                &mut c,
                &format!(
                    r#"{{"id":{},"publish":{{"channel":"h","data":{n}}}}}"#,
                    100 + n
                ),
            );
            reply(&mut c, 100 + n);
        }
        let mut ask = |id: u64, args: &str| -> Vec<u64> {
            send(
                &mut c,
                &format!(r#"{{"id":{id},"history":{{"channel":"h",{args}}}}}"#),
            );
            let r = reply(&mut c, id);
            r["history"]["publications"]
                .as_array()
                .unwrap_or_else(|| panic!("{args}: {r}"))
                .iter()
                .map(|p| p["data"].as_u64().expect("n"))
                .collect()
        };
        // History keeps 8 (Redis: 8 and at most a node more; here a fresh stream keeps all
        // 12 until trimmed by whole nodes, so compare against what it says it holds).
        let oldest = ask(3, r#""limit":3"#);
        assert_eq!(oldest.len(), 3);
        assert!(oldest.windows(2).all(|w| w[1] == w[0] + 1), "{oldest:?}");
        assert_eq!(ask(4, r#""limit":3,"reverse":true"#), [12, 11, 10]);
        let since = |o: u64| format!(r#""since":{{"epoch":"{epoch}","offset":{o}}}"#);
        assert_eq!(ask(5, &format!(r#""limit":2,{}"#, since(9))), [10, 11]);
        assert_eq!(
            ask(6, &format!(r#""limit":2,"reverse":true,{}"#, since(9))),
            [8, 7]
        );
        assert_eq!(ask(7, r#""limit":0"#), Vec::<u64>::new());
        // In memory history keeps exactly 8: offset 1 is trimmed (Redis trims whole
        // stream nodes of 100, so there it is still held).
        if std::ptr::eq(a, &standalone) {
            send(
                &mut c,
                &format!(
                    r#"{{"id":8,"history":{{"channel":"h","limit":2,{}}}}}"#,
                    since(1)
                ),
            );
            assert_eq!(reply(&mut c, 8)["error"]["code"], 112, "1 is trimmed away");
        }
    }
}

/// `history` commands waiting for a Redis that does not answer are bounded per client
/// (8; the rest get 106 at once), and are answered once Redis is back.
#[test]
fn history_commands_waiting_for_redis_are_bounded() {
    let redis = Redis::start();
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str()];
    args.extend_from_slice(FAST_FAILOVER);
    let a = Wsfan::start(&args);
    eventually(10.0, "instance ready", || a.status("/readyz") == 200);
    let mut c = connect(&a.url("/connection/websocket"));
    c.send(Message::text(r#"{"id":1,"connect":{}}"#))
        .expect("send");
    recv_text(&mut c);
    redis.signal("STOP");
    let many: Vec<String> = (0..10)
        .map(|i| {
            format!(
                r#"{{"id":{},"history":{{"channel":"h","limit":0}}}}"#,
                i + 2
            )
        })
        .collect();
    c.send(Message::text(many.join("\n"))).expect("send");
    let mut limited = 0;
    while limited < 2 {
        let r: serde_json::Value = serde_json::from_str(&recv_text(&mut c)).expect("reply");
        assert_eq!(r["error"]["code"], 106, "{r}");
        limited += 1;
    }
    redis.signal("CONT");
    for _ in 0..8 {
        let r: serde_json::Value = serde_json::from_str(&recv_text(&mut c)).expect("reply");
        assert!(r["history"].is_object(), "{r}");
    }
}
