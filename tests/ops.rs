//! Operating and protecting it: metrics, keepalive, rate limit, origin, JWT, publish API,
//! SO_REUSEPORT, systemd notify.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tungstenite::Message;

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn metrics_follow_traffic() {
    let s = Wsfan::start(&[]);
    let text = {
        let (st, head, body) = http(
            s.addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(st, 200);
        assert!(head.contains("text/plain; version=0.0.4"));
        String::from_utf8(body).unwrap()
    };
    for name in [
        "wsfan_connections",
        "wsfan_connections_total",
        "wsfan_handshake_rejections_total",
        "wsfan_messages_received_total",
        "wsfan_messages_published_total",
        "wsfan_messages_delivered_total",
        "wsfan_bytes_sent_total",
        "wsfan_disconnects_total",
        "wsfan_channels",
        "wsfan_redis_up",
        "wsfan_redis_reconnects_total",
        "wsfan_redis_buffer_messages",
        "wsfan_redis_buffer_dropped_total",
        "wsfan_loop_iteration_seconds",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
    let mut a = connect(&s.url("/ws/m1"));
    let mut b = connect(&s.url("/ws/m1"));
    let _c = connect(&s.url("/ws/m2"));
    for i in 0..5 {
        send_text(&mut a, &format!("{i}"));
    }
    for _ in 0..5 {
        recv(&mut a);
        recv(&mut b);
    }
    assert_eq!(s.metric("wsfan_messages_received_total"), 5.0);
    assert_eq!(s.metric("wsfan_messages_published_total"), 5.0);
    assert_eq!(s.metric("wsfan_messages_delivered_total"), 10.0);
    assert_eq!(s.metric("wsfan_channels"), 2.0);
    assert!(s.metric("wsfan_connections") >= 3.0);
    assert!(s.metric("wsfan_bytes_sent_total") >= 30.0);
    assert!(s.metric("wsfan_loop_iteration_seconds_count") > 0.0);
    assert_eq!(upgrade_status(&s.url("/ws/"), &[]), Some(400));
    assert_eq!(
        s.metric("wsfan_handshake_rejections_total{reason=\"bad_channel\"}"),
        1.0
    );
}

#[test]
fn silent_client_is_dropped_by_ping_timeout_and_a_live_one_stays() {
    let s = Wsfan::start(&["--ping-interval", "0.3"]);
    // A raw client that completes the upgrade and then never reads or answers pings.
    let mut raw = TcpStream::connect(s.addr).unwrap();
    raw.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let mut live = connect(&s.url("/"));
    live.get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    eventually(10.0, "silent client dropped for ping timeout", || {
        // Reading lets tungstenite answer pings for the live client.
        let _ = live.read();
        s.metric("wsfan_disconnects_total{reason=\"ping_timeout\"}") >= 1.0
    });
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink); // ends: the server closed it
    live.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    send_text(&mut live, "still here");
    assert_eq!(recv_text(&mut live), "still here");
    assert_eq!(
        s.metric("wsfan_disconnects_total{reason=\"ping_timeout\"}"),
        1.0
    );
}

#[test]
fn flooding_client_is_closed_1008_by_rate_limit() {
    let s = Wsfan::start(&["--max-messages-per-sec", "10", "--max-messages-burst", "5"]);
    let mut quiet = connect(&s.url("/ws/rl"));
    let mut flood = connect(&s.url("/ws/rl"));
    for i in 0..30 {
        if flood.send(Message::text(format!("{i}"))).is_err() {
            break;
        }
    }
    assert_eq!(expect_close(&mut flood), 1008);
    assert_eq!(
        s.metric("wsfan_disconnects_total{reason=\"rate_limit\"}"),
        1.0
    );
    // The burst (5) got through; the other client is untouched.
    for i in 0..5 {
        assert_eq!(recv_text(&mut quiet), format!("{i}"));
    }
    send_text(&mut quiet, "ok");
    assert_eq!(recv_text(&mut quiet), "ok");
}

#[test]
fn origins_same_host_by_default_list_or_wildcard() {
    let s = Wsfan::start(&[]);
    let host = s.addr.to_string();
    let same = format!("http://{host}");
    assert_eq!(upgrade_status(&s.url("/"), &[("Origin", &same)]), None);
    assert_eq!(
        upgrade_status(&s.url("/"), &[("Origin", "http://evil.example")]),
        Some(403)
    );
    assert_eq!(
        upgrade_status(&s.url("/"), &[]),
        None,
        "no Origin: not a browser"
    );
    let listed = Wsfan::start(&["--allowed-origins", "https://app.example,https://b.example"]);
    assert_eq!(
        upgrade_status(&listed.url("/"), &[("Origin", "https://b.example")]),
        None
    );
    assert_eq!(
        upgrade_status(
            &listed.url("/"),
            &[("Origin", &format!("http://{}", listed.addr))]
        ),
        Some(403)
    );
    let any = Wsfan::start(&["--allowed-origins", "*"]);
    assert_eq!(
        upgrade_status(&any.url("/"), &[("Origin", "http://evil.example")]),
        None
    );
    assert_eq!(
        s.metric("wsfan_handshake_rejections_total{reason=\"origin\"}"),
        1.0
    );
}

#[test]
fn jwt_valid_expired_wrong_signature_and_channel_scope() {
    let s = Wsfan::start_env(&[], &[("WSFAN_JWT_SECRET", "topsecret")]);
    let exp = now_unix() + 3600;
    let good = wsfan::jwt::sign(
        &format!(r#"{{"sub":"u1","exp":{exp},"channels":["room.*"]}}"#),
        "topsecret",
    );
    let expired = wsfan::jwt::sign(r#"{"sub":"u1","exp":1000}"#, "topsecret");
    let forged = wsfan::jwt::sign(r#"{"sub":"u1"}"#, "guess");
    let mut c = connect(&s.url(&format!("/ws/room.1?token={good}")));
    send_text(&mut c, "authorized");
    assert_eq!(recv_text(&mut c), "authorized");
    assert_eq!(
        upgrade_status(&s.url(&format!("/ws/lobby?token={good}")), &[]),
        Some(403)
    );
    assert_eq!(
        upgrade_status(&s.url(&format!("/ws/room.1?token={expired}")), &[]),
        Some(401)
    );
    assert_eq!(
        upgrade_status(&s.url(&format!("/ws/room.1?token={forged}")), &[]),
        Some(401)
    );
    assert_eq!(upgrade_status(&s.url("/ws/room.1"), &[]), Some(401));
    let none_alg = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1MSJ9.";
    assert_eq!(
        upgrade_status(&s.url(&format!("/ws/room.1?token={none_alg}")), &[]),
        Some(401)
    );
}

fn post(
    addr: std::net::SocketAddr,
    path: &str,
    key: Option<&str>,
    ctype: &str,
    body: &[u8],
) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    read_response(&mut s, false).0
}

#[test]
fn publish_api_across_two_instances_and_every_error() {
    let mut redis = Redis::start();
    let url = redis.url();
    let args = [
        "--redis",
        url.as_str(),
        "--api-key",
        "k3y",
        "--max-message-size",
        "100",
        "--redis-buffer-messages",
        "2",
        "--redis-backoff-max",
        "0.3",
    ];
    let a = Wsfan::start(&args);
    let b = Wsfan::start(&args);
    for s in [&a, &b] {
        eventually(10.0, "ready", || s.status("/readyz") == 200);
    }
    let mut on_b = connect(&b.url("/ws/dash"));
    let to_a = |key: Option<&str>, ctype: &str, body: &[u8]| {
        post(a.addr, "/publish/dash", key, ctype, body)
    };
    assert_eq!(to_a(Some("k3y"), "text/plain", b"cpu 42%"), 202);
    assert_eq!(recv(&mut on_b), Message::text("cpu 42%"));
    assert_eq!(
        to_a(Some("k3y"), "application/octet-stream", &[1, 2, 3]),
        202
    );
    assert_eq!(recv(&mut on_b), Message::binary(vec![1u8, 2, 3]));
    assert_eq!(to_a(None, "text/plain", b"x"), 401);
    assert_eq!(to_a(Some("wrong"), "text/plain", b"x"), 401);
    assert_eq!(
        post(
            a.addr,
            "/publish/bad%20name",
            Some("k3y"),
            "text/plain",
            b"x"
        ),
        400
    );
    assert_eq!(to_a(Some("k3y"), "text/plain", &[0xff, 0xfe]), 400);
    assert_eq!(to_a(Some("k3y"), "text/plain", &[b'a'; 101]), 413);
    let off = Wsfan::start(&[]);
    assert_eq!(
        post(off.addr, "/publish/dash", Some("k3y"), "text/plain", b"x"),
        404
    );
    // Outage: accepted into the buffer (2 messages), then 503 when it is full.
    redis.kill();
    eventually(10.0, "a sees redis down", || a.status("/readyz") == 503);
    assert_eq!(to_a(Some("k3y"), "text/plain", b"q1"), 202);
    assert_eq!(to_a(Some("k3y"), "text/plain", b"q2"), 202);
    assert_eq!(to_a(Some("k3y"), "text/plain", b"q3"), 503);
    redis.restart();
    eventually(10.0, "b ready again", || b.status("/readyz") == 200);
    eventually(10.0, "a flushed its buffer", || {
        a.metric("wsfan_redis_buffer_messages") == 0.0
    });
    // b came back too, before or after a flushed: with history it gets the buffered
    // ones either way (a new epoch is delivered from its first offset), then the next.
    assert_eq!(to_a(Some("k3y"), "text/plain", b"after"), 202);
    for want in ["q1", "q2", "after"] {
        assert_eq!(recv(&mut on_b), Message::text(want));
    }
}

#[test]
fn reuse_port_processes_share_one_port_and_talk_through_redis() {
    let redis = Redis::start();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = redis.url();
    let args = [
        "--listen",
        listen.as_str(),
        "--reuse-port",
        "--redis",
        url.as_str(),
    ];
    let a = Wsfan::start(&args);
    let b = Wsfan::start(&args);
    for s in [&a, &b] {
        eventually(10.0, "ready", || s.status("/readyz") == 200);
    }
    let mut clients: Vec<Ws> = (0..40)
        .map(|_| connect(&format!("ws://{listen}/ws/shared")))
        .collect();
    let (ca, cb) = (a.metric("wsfan_connections"), b.metric("wsfan_connections"));
    // Each scrape is itself a connection on one of them; the WebSockets are spread.
    assert!(
        ca >= 5.0 && cb >= 5.0,
        "kernel spread connections: a={ca} b={cb}"
    );
    send_text(&mut clients[0], "one port, two processes");
    for c in clients.iter_mut() {
        assert_eq!(recv_text(c), "one port, two processes");
    }
}

/// A Unix datagram socket standing in for systemd's `$NOTIFY_SOCKET`, in a fresh folder
/// (removed on drop).
struct NotifySocket {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
    sock: std::os::unix::net::UnixDatagram,
}

impl NotifySocket {
    fn new(tag: &str) -> NotifySocket {
        let dir = std::env::temp_dir().join(format!("wsfan-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        NotifySocket { dir, path, sock }
    }

    fn env(&self) -> (&'static str, &str) {
        ("NOTIFY_SOCKET", self.path.to_str().unwrap())
    }

    fn recv(&self) -> Vec<u8> {
        let mut buf = [0u8; 256];
        let n = self
            .sock
            .recv(&mut buf)
            .expect("a notification within 10 s");
        buf[..n].to_vec()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn systemd_notify_ready_and_stopping() {
    let notify = NotifySocket::new("notify");
    let redis = Redis::start();
    let url = redis.url();
    let mut s = Wsfan::start_env(&["--redis", &url], &[notify.env()]);
    assert_eq!(notify.recv(), b"READY=1");
    assert_eq!(
        s.status("/readyz"),
        200,
        "READY=1 only once subscribed/ready"
    );
    s.signal("TERM");
    assert_eq!(notify.recv(), b"STOPPING=1");
    assert_eq!(s.wait_exit(10.0).code(), Some(0));
}

#[test]
fn a_service_manager_that_does_not_read_never_stalls_the_loop() {
    let notify = NotifySocket::new("notify-full");
    // Fill its queue: the next sender would wait.
    let filler = std::os::unix::net::UnixDatagram::unbound().unwrap();
    filler.set_nonblocking(true).unwrap();
    let mut queued = 0;
    while filler.send_to(b"X=1", &notify.path).is_ok() {
        queued += 1;
        assert!(queued < 1_000_000, "queue never filled");
    }
    let s = Wsfan::start_env(&[], &[notify.env()]);
    s.wait_log("could not notify service manager (READY=1)", 10.0);
    assert_eq!(s.status("/healthz"), 200);
    let mut ws = connect(&s.url("/"));
    send_text(&mut ws, "still serving");
    assert_eq!(recv_text(&mut ws), "still serving");
}

#[test]
fn standalone_notifies_ready_without_waiting_for_traffic() {
    let notify = NotifySocket::new("notify-alone");
    let _s = Wsfan::start_env(&[], &[notify.env()]);
    // No request is made: READY=1 must not wait for one (or for the 25 s ping timer).
    assert_eq!(notify.recv(), b"READY=1");
}

/// Runs the binary with `args` and returns (exit status, stderr).
fn run_fails(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsfan"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn per_core_processes_without_a_backplane_refuse_to_start() {
    let listen = format!("127.0.0.1:{}", free_port());
    let (code, err) = run_fails(&["--listen", &listen, "--reuse-port"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--reuse-port") && err.contains("--redis") && err.contains("--standalone"),
        "{err}"
    );
    // Opting in works (and then serves).
    let s = Wsfan::start(&["--listen", &listen, "--reuse-port", "--standalone"]);
    assert_eq!(s.status("/healthz"), 200);
}

#[test]
fn a_port_in_use_names_the_address_and_the_flag() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let (code, err) = run_fails(&["--listen", &listen]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on {listen} (--listen)")),
        "{err}"
    );
}

#[test]
fn an_argument_without_dashes_says_what_is_expected() {
    let (code, err) = run_fails(&["8080"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("unexpected argument \"8080\"") && err.contains("--help"),
        "{err}"
    );
}

/// The systemd unit verifies clean as an instance (`wsfan@0`) and keeps its sandbox
/// score; a template can't be verified (`CPUAffinity=%i` needs a number).
#[test]
fn the_systemd_unit_verifies_as_an_instance() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("note: no systemd-analyze here; unit not verified");
        return;
    }
    let dir = std::env::temp_dir().join(format!("wsfan-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit = std::fs::read_to_string("deploy/wsfan@.service")
        .unwrap()
        .replace("/usr/local/bin/wsfan", env!("CARGO_BIN_EXE_wsfan"));
    assert!(
        unit.contains("\nEnvironmentFile=/etc/wsfan.env"),
        "required, not -optional"
    );
    let path = dir.join("wsfan@0.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "./wsfan@0.service"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for wsfan@0.service: ").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(score <= 1.4, "exposure {score}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every `wsfan_*` series the Grafana dashboard queries exists on a live /metrics page.
#[test]
fn the_grafana_dashboard_names_only_metrics_that_exist() {
    let text = std::fs::read_to_string("deploy/grafana-wsfan.json").unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let redis = Redis::start();
    let s = Wsfan::start(&["--redis", &redis.url()]);
    let (_, _, body) = http(
        s.addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let page = String::from_utf8(body).unwrap();
    let families: std::collections::HashSet<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut named = 0;
    for e in &exprs {
        for (i, _) in e.match_indices("wsfan_") {
            let name: String = e[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| name.strip_suffix(suf))
                .filter(|f| families.contains(f))
                .unwrap_or(&name);
            assert!(
                families.contains(family),
                "{name} (in {e}) is not on /metrics"
            );
            named += 1;
        }
    }
    for wanted in [
        "wsfan_connections",
        "wsfan_messages_delivered_total",
        "wsfan_disconnects_total",
        "wsfan_redis_up",
        "wsfan_redis_reconnects_total",
        "wsfan_loop_iteration_seconds_bucket",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(wanted)),
            "no panel for {wanted}"
        );
    }
    assert!(named >= 10);
}
