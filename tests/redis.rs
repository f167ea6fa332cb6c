//! Redis backplane: several wsfan processes sharing private redis-server processes.

mod common;
use common::*;
use std::collections::HashSet;
use std::time::Duration;
use tungstenite::Message;

fn instance(redis: &Redis, extra: &[&str]) -> Wsfan {
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str()];
    args.extend_from_slice(extra);
    let s = Wsfan::start(&args);
    eventually(10.0, "instance ready", || s.status("/readyz") == 200);
    s
}

fn kinds_payloads(ws: &mut Ws, n: usize) -> Vec<Message> {
    (0..n).map(|_| recv(ws)).collect()
}

#[test]
fn three_instances_deliver_everything_once_in_one_order() {
    let redis = Redis::start();
    let instances: Vec<Wsfan> = (0..3).map(|_| instance(&redis, &[])).collect();
    let per_instance = 4;
    let mut clients: Vec<Ws> = instances
        .iter()
        .flat_map(|s| {
            (0..per_instance)
                .map(|_| connect(&s.url("/ws/room")))
                .collect::<Vec<_>>()
        })
        .collect();
    let rounds = 10;
    let mut sent = Vec::new();
    for r in 0..rounds {
        for (i, c) in clients.iter_mut().enumerate() {
            let m = match (i + r) % 3 {
                0 => Message::text(format!("t{i}:{r}")),
                1 => Message::binary(format!("b{i}:{r}").into_bytes()),
                _ => Message::binary(Vec::new()),
            };
            c.send(m.clone()).unwrap();
            sent.push(m);
        }
    }
    let total = sent.len();
    let mut reference: Option<Vec<Message>> = None;
    for c in clients.iter_mut() {
        let got = kinds_payloads(c, total);
        let mut a: Vec<String> = got.iter().map(|m| format!("{m:?}")).collect();
        let mut b: Vec<String> = sent.iter().map(|m| format!("{m:?}")).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "every message exactly once, kinds preserved");
        match &reference {
            None => reference = Some(got),
            Some(r) => assert_eq!(r, &got, "same order on every client of every instance"),
        }
    }
    // Exactly once: nothing more is pending. A marker is the next message everywhere.
    send_text(&mut clients[0], "marker");
    for c in clients.iter_mut() {
        assert_eq!(recv(c), Message::text("marker"));
    }
}

#[test]
fn subscriptions_follow_local_interest_and_channels_stay_isolated() {
    let redis = Redis::start();
    let a = instance(&redis, &["--channel-prefix", "app:"]);
    let b = instance(&redis, &["--channel-prefix", "app:"]);
    assert!(redis.channels().is_empty(), "no clients, no subscriptions");
    let mut a1 = connect(&a.url("/ws/one"));
    eventually(5.0, "one subscribed once", || redis.numsub("app:one") == 1);
    let mut b2 = connect(&b.url("/ws/two"));
    let mut b1 = connect(&b.url("/ws/one"));
    eventually(5.0, "one subscribed by both", || {
        redis.numsub("app:one") == 2
    });
    assert_eq!(redis.numsub("app:two"), 1, "only b wants two");
    assert_eq!(
        redis.channels(),
        vec!["app:one".to_string(), "app:two".to_string()]
    );
    send_text(&mut a1, "for one");
    send_text(&mut b2, "for two");
    assert_eq!(recv_text(&mut a1), "for one");
    assert_eq!(recv_text(&mut b1), "for one");
    assert_eq!(recv_text(&mut b2), "for two");
    drop(b2);
    eventually(5.0, "two unsubscribed when its last client left", || {
        redis.numsub("app:two") == 0
    });
    drop(a1);
    eventually(5.0, "a stops receiving one", || {
        redis.numsub("app:one") == 1
    });
    send_text(&mut b1, "still");
    assert_eq!(recv_text(&mut b1), "still");
}

#[test]
fn a_101_means_subscribed_so_the_first_message_comes_back() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    for i in 0..30 {
        let mut c = connect(&a.url(&format!("/ws/fresh{i}")));
        send_text(&mut c, "first");
        assert_eq!(recv_text(&mut c), "first", "channel fresh{i}");
    }
}

#[test]
fn interop_with_plain_redis_publish_and_subscribe() {
    let redis = Redis::start();
    let a = instance(&redis, &["--history-size", "0"]);
    let mut ws = connect(&a.url("/"));
    eventually(5.0, "subscribed", || redis.numsub("chat_messages") == 1);
    // redis-cli PUBLISH → text to WebSocket clients.
    assert_eq!(redis.publish("chat_messages", b"hello from redis"), 1);
    assert_eq!(recv(&mut ws), Message::text("hello from redis"));
    // Non-UTF-8 bytes from a foreign publisher arrive as binary.
    redis.publish("chat_messages", &[0xff, 0x00]);
    assert_eq!(recv(&mut ws), Message::binary(vec![0xffu8, 0x00]));
    // A plain Redis subscriber sees wsfan's text verbatim.
    let mut sub_conn = redis.conn();
    let mut sub = sub_conn.as_pubsub();
    sub.subscribe("chat_messages").unwrap();
    sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    eventually(5.0, "plain subscriber registered", || {
        redis.numsub("chat_messages") == 2
    });
    send_text(&mut ws, "typed in a browser");
    let msg = sub.get_message().unwrap();
    assert_eq!(msg.get_payload_bytes(), b"typed in a browser");
    assert_eq!(recv_text(&mut ws), "typed in a browser");
    // Binary travels in the envelope; text that looks like the envelope stays text.
    ws.send(Message::binary(vec![1u8, 2])).unwrap();
    assert_eq!(
        sub.get_message().unwrap().get_payload_bytes(),
        b"\0b\x01\x02"
    );
    assert_eq!(recv(&mut ws), Message::binary(vec![1u8, 2]));
    send_text(&mut ws, "\0bnot binary");
    assert_eq!(recv(&mut ws), Message::text("\0bnot binary"));
}

#[test]
fn redis_restart_loses_nothing_clients_sent_and_readyz_follows() {
    let mut redis = Redis::start();
    let a = instance(&redis, FAST_FAILOVER);
    let b = instance(&redis, FAST_FAILOVER);
    let mut wa = connect(&a.url("/ws/r"));
    let mut wb = connect(&b.url("/ws/r"));
    send_text(&mut wa, "before");
    assert_eq!(recv_text(&mut wa), "before");
    assert_eq!(recv_text(&mut wb), "before");
    redis.kill();
    eventually(10.0, "readyz 503 while redis is down", || {
        a.status("/readyz") == 503
    });
    for i in 0..50 {
        send_text(&mut wa, &format!("during {i}"));
    }
    assert!(a.metric("wsfan_redis_buffer_messages") >= 1.0);
    assert_eq!(a.metric("wsfan_redis_up"), 0.0);
    redis.restart();
    eventually(15.0, "readyz 200 after redis is back", || {
        a.status("/readyz") == 200
    });
    // b re-subscribes on its own schedule; a flushes only after a re-subscribed, so a's
    // own client sees everything. Check a's client strictly, b's if it was back in time.
    for i in 0..50 {
        assert_eq!(recv_text(&mut wa), format!("during {i}"));
    }
    eventually(15.0, "b ready", || b.status("/readyz") == 200);
    send_text(&mut wb, "after");
    assert_eq!(recv_text(&mut wa), "after");
    loop {
        let t = recv_text(&mut wb);
        if t == "after" {
            break;
        }
        assert!(t.starts_with("during "), "{t}");
    }
    assert!(a.metric("wsfan_redis_reconnects_total") >= 1.0);
    assert_eq!(a.metric("wsfan_redis_buffer_dropped_total"), 0.0);
}

#[test]
fn outage_buffer_drops_oldest_counts_it_and_stays_bounded() {
    let mut redis = Redis::start();
    let a = instance(
        &redis,
        &["--redis-buffer-messages", "5", "--redis-backoff-max", "0.3"],
    );
    let mut w = connect(&a.url("/ws/o"));
    redis.kill();
    eventually(10.0, "redis seen down", || a.status("/readyz") == 503);
    for i in 0..20 {
        send_text(&mut w, &format!("m{i}"));
    }
    eventually(5.0, "drops counted", || {
        a.metric("wsfan_redis_buffer_dropped_total") == 15.0
    });
    assert_eq!(a.metric("wsfan_redis_buffer_messages"), 5.0);
    redis.restart();
    for i in 15..20 {
        assert_eq!(
            recv_text(&mut w),
            format!("m{i}"),
            "oldest dropped, newest kept in order"
        );
    }
    // The five count against the limit until Redis's replies are read, which can come
    // after their deliveries: a sixth sent before that would be dropped (the limit).
    eventually(5.0, "buffer drained", || {
        a.metric("wsfan_redis_buffer_messages") == 0.0
    });
    send_text(&mut w, "next");
    assert_eq!(recv_text(&mut w), "next");
}

#[test]
fn outage_buffer_bytes_limit_holds() {
    let mut redis = Redis::start();
    let a = instance(
        &redis,
        &[
            "--redis-buffer-bytes",
            "100000",
            "--redis-backoff-max",
            "0.3",
        ],
    );
    let mut w = connect(&a.url("/ws/o"));
    redis.kill();
    eventually(10.0, "redis seen down", || a.status("/readyz") == 503);
    let payload = "x".repeat(10_000);
    for _ in 0..30 {
        send_text(&mut w, &payload);
    }
    eventually(5.0, "byte limit enforced", || {
        a.metric("wsfan_redis_buffer_dropped_total") >= 20.0
    });
    assert!(a.metric("wsfan_redis_buffer_bytes") <= 100000.0);
}

#[test]
fn unreachable_redis_at_startup_is_retried_and_not_served_as_clustered() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let a = Wsfan::start(&[
        "--redis",
        &url,
        "--handshake-timeout",
        "1",
        "--redis-backoff-max",
        "0.3",
    ]);
    a.wait_log("failed", 5.0);
    assert_eq!(a.status("/healthz"), 200);
    assert_eq!(a.status("/readyz"), 503);
    // An upgrade is not confirmed while nothing is subscribed: 503 at the handshake deadline.
    assert_eq!(upgrade_status(&a.url("/ws/x"), &[]), Some(503));
    // Redis appears on that port: the instance connects by itself.
    let _redis = Redis::start_on(port);
    eventually(10.0, "ready once redis exists", || {
        a.status("/readyz") == 200
    });
    let mut c = connect(&a.url("/ws/x"));
    send_text(&mut c, "now");
    assert_eq!(recv_text(&mut c), "now");
}

#[test]
fn silent_dead_link_is_noticed_by_ping_deadline() {
    let redis = Redis::start();
    let a = instance(&redis, FAST_FAILOVER);
    let _c = connect(&a.url("/ws/p"));
    // Redis stops answering anyone for 2 s: no FIN, no RST, just silence.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("ALL")
        .query(&mut redis.conn())
        .unwrap();
    a.wait_log("PING unanswered", 5.0);
    eventually(10.0, "reconnected and ready", || {
        a.status("/readyz") == 200 && a.metric("wsfan_redis_reconnects_total") >= 1.0
    });
}

#[test]
fn clients_stay_connected_through_an_outage() {
    let mut redis = Redis::start();
    let a = instance(&redis, &["--redis-backoff-max", "0.3"]);
    let mut clients: Vec<Ws> = (0..10).map(|_| connect(&a.url("/ws/stay"))).collect();
    redis.kill();
    eventually(10.0, "down", || a.status("/readyz") == 503);
    redis.restart();
    eventually(10.0, "up", || a.status("/readyz") == 200);
    send_text(&mut clients[3], "all here");
    let mut seen = HashSet::new();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(recv_text(c), "all here");
        seen.insert(i);
    }
    assert_eq!(seen.len(), 10);
}

#[test]
fn large_messages_cross_instances_intact_through_partial_reads() {
    // 60 KB payloads arrive from Redis in many partial reads: the incremental parser
    // must resume mid-value every time.
    let redis = Redis::start();
    let a = instance(&redis, &["--max-message-size", "65536"]);
    let b = instance(&redis, &["--max-message-size", "65536"]);
    let mut on_a = connect(&a.url("/ws/big"));
    let mut on_b = connect(&b.url("/ws/big"));
    let msgs: Vec<Vec<u8>> = (0..40u8)
        .map(|i| (0..60_000).map(|j| (j as u8) ^ i).collect())
        .collect();
    // Batches of 10 (600 KB) stay under the 1 MiB output cap of a client that is not
    // reading while it sends.
    for batch in msgs.chunks(10) {
        for m in batch {
            on_a.send(Message::binary(m.clone())).unwrap();
        }
        for ws in [&mut on_a, &mut on_b] {
            for m in batch {
                assert_eq!(recv(ws), Message::binary(m.clone()));
            }
        }
    }
}

#[test]
fn unix_socket_url_and_password_work() {
    let sock = std::env::temp_dir().join(format!("wsfan-redis-{}.sock", std::process::id()));
    let sock_s = sock.to_str().unwrap().to_string();
    let redis = Redis::start_with(&["--unixsocket", &sock_s, "--requirepass", "pw"]);
    let a = Wsfan::start(&["--redis", &format!("unix://{sock_s}?pass=pw")]);
    eventually(10.0, "ready over the unix socket", || {
        a.status("/readyz") == 200
    });
    // The log names the target without the password.
    assert!(
        !a.log().contains("pw@") && !a.log().contains("=pw"),
        "{}",
        a.log()
    );
    let mut c = connect(&a.url("/ws/u"));
    send_text(&mut c, "via unix socket");
    assert_eq!(recv_text(&mut c), "via unix socket");
    // A wrong password: clear log, never ready, keeps retrying.
    let b = Wsfan::start(&[
        "--redis",
        &format!("unix://{sock_s}?pass=wrong"),
        "--redis-backoff-max",
        "0.2",
    ]);
    b.wait_log("login refused", 10.0);
    assert_eq!(b.status("/readyz"), 503);
    drop(redis);
    let _ = std::fs::remove_file(sock);
}

#[test]
fn subscription_link_is_drained_fast_enough_for_a_strict_redis_output_limit() {
    // Redis drops a Pub/Sub client whose output buffer passes 64 KB for 1 s: wsfan must
    // read its subscription socket promptly while a burst arrives.
    let redis = Redis::start_with(&["--client-output-buffer-limit", "pubsub 256kb 64kb 1"]);
    let a = instance(&redis, &[]);
    let mut ws = connect(&a.url("/ws/burst"));
    eventually(5.0, "subscribed", || redis.numsub("burst") == 1);
    let payload = vec![b'p'; 1000];
    let mut pipe = redis::pipe();
    for _ in 0..600 {
        pipe.cmd("PUBLISH").arg("burst").arg(&payload[..]).ignore();
    }
    let _: () = pipe.query(&mut redis.conn()).unwrap();
    for _ in 0..600 {
        assert_eq!(
            recv(&mut ws),
            Message::text(String::from_utf8(payload.clone()).unwrap())
        );
    }
    assert_eq!(
        a.metric("wsfan_redis_reconnects_total"),
        0.0,
        "Redis never cut us off"
    );
}

#[test]
fn publishes_in_flight_when_redis_dies_are_sent_again_in_order() {
    // Redis is paused for writes, so wsfan's PUBLISHes sit unanswered (in flight); then
    // Redis is killed. wsfan must re-send them after the restart, before newer ones.
    // (Redis runs without persistence here: a publish it had applied but not yet
    // written to subscribers when it died is lost with its data — README, History.)
    let mut redis = Redis::start();
    let a = instance(&redis, &["--redis-backoff-max", "0.3"]);
    let mut rx = connect(&a.url("/ws/stream"));
    let mut tx = connect(&a.url("/ws/stream"));
    for i in 0..100 {
        send_text(&mut tx, &format!("{i}"));
    }
    for i in 0..100 {
        assert_eq!(recv_text(&mut rx), format!("{i}"));
    }
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10_000)
        .arg("WRITE")
        .query(&mut redis.conn())
        .unwrap();
    for i in 100..200 {
        send_text(&mut tx, &format!("{i}"));
    }
    eventually(5.0, "publishes in flight", || {
        a.metric("wsfan_redis_buffer_messages") == 100.0
    });
    redis.kill();
    eventually(10.0, "redis seen down", || a.status("/readyz") == 503);
    for i in 200..250 {
        send_text(&mut tx, &format!("{i}"));
    }
    redis.restart();
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    while seen.len() < 150 {
        let n: usize = recv_text(&mut rx).parse().unwrap();
        assert!(n >= 100, "{n} delivered twice");
        if seen.insert(n) {
            order.push(n);
        }
    }
    assert_eq!(order, (100..250).collect::<Vec<_>>());
}

#[test]
fn oversized_foreign_messages_are_skipped_not_held_and_cut_no_client() {
    let redis = Redis::start();
    let a = instance(&redis, &["--max-message-size", "4096"]);
    let mut ws1 = connect(&a.url("/ws/big"));
    let mut ws2 = connect(&a.url("/ws/big"));
    eventually(5.0, "subscribed", || redis.numsub("big") == 1);
    let pid = a.child.id();
    let peak0 = peak_rss_kb(pid);
    // A foreign publisher (not bound by wsfan's limits) sends one byte over the limit,
    // then 16 MiB; then messages exactly at the limit, text and enveloped binary.
    redis.publish("big", &[b'x'; 4097]);
    redis.publish("big", &vec![b'y'; 16 << 20]);
    redis.publish("big", &[b'z'; 4096]);
    let mut bin = b"\0b".to_vec();
    bin.extend_from_slice(&[7u8; 4096]);
    redis.publish("big", &bin);
    redis.publish("big", b"after");
    let brief = |m: Message| match m {
        Message::Text(t) => ("text", t.len(), t.as_bytes().first().copied()),
        Message::Binary(b) => ("binary", b.len(), b.first().copied()),
        other => panic!("{other:?}"),
    };
    for ws in [&mut ws1, &mut ws2] {
        assert_eq!(brief(recv(ws)), ("text", 4096, Some(b'z')));
        assert_eq!(brief(recv(ws)), ("binary", 4096, Some(7)));
        assert_eq!(recv_text(ws), "after");
    }
    assert_eq!(a.metric("wsfan_redis_oversize_dropped_total"), 2.0);
    assert_eq!(
        a.metric("wsfan_redis_reconnects_total"),
        0.0,
        "the link stayed up"
    );
    let grew = peak_rss_kb(pid).saturating_sub(peak0);
    assert!(
        grew < 4096,
        "peak RSS grew by {grew} KiB while a 16 MiB message went past"
    );
    send_text(&mut ws1, "still both ways");
    assert_eq!(recv_text(&mut ws1), "still both ways");
    assert_eq!(recv_text(&mut ws2), "still both ways");
}

#[test]
fn host_names_are_resolved_off_the_loop_even_when_dns_hangs() {
    let Some(dns) = FakeDns::start(vec![std::net::Ipv4Addr::LOCALHOST]) else {
        return;
    };
    let redis = Redis::start();
    let url = format!("redis://redis.wsfan.test:{}", redis.port);
    let a = Wsfan::start_with_resolv_conf(
        &dns.resolv_conf,
        &["--redis", &url, "--redis-timeout", "60"],
    );
    eventually(10.0, "wsfan asks DNS", || dns.queries() > 0);
    // The lookup now hangs (up to 30 s per query); the loop must not.
    for _ in 0..3 {
        assert_eq!(a.status("/healthz"), 200);
        assert_eq!(a.status("/readyz"), 503);
    }
    dns.answer();
    eventually(10.0, "ready once the name resolves", || {
        a.status("/readyz") == 200
    });
    let mut ws = connect(&a.url("/ws/dns"));
    send_text(&mut ws, "via a resolved name");
    assert_eq!(recv_text(&mut ws), "via a resolved name");
    eventually(5.0, "resolver processes reaped", || {
        children(a.child.id()).is_empty()
    });
}

/// DNS answering redis.wsfan.test with [127.0.0.2, 127.0.0.3] and a redis-server on
/// 127.0.0.3 (and 127.0.0.1 for the helpers), so the first address has no Redis. Neither
/// address is 127.0.0.1, which glibc would sort first. `None` without root.
fn two_addresses_redis_on_the_second() -> Option<(FakeDns, Redis)> {
    let ips = vec![
        std::net::Ipv4Addr::new(127, 0, 0, 2),
        std::net::Ipv4Addr::new(127, 0, 0, 3),
    ];
    let dns = FakeDns::start(ips)?;
    dns.answer();
    Some((dns, Redis::start_with(&["--bind", "127.0.0.1 127.0.0.3"])))
}

#[test]
fn a_name_with_several_addresses_falls_through_to_one_that_answers() {
    // 127.0.0.2 refuses (nothing listens there).
    let Some((dns, redis)) = two_addresses_redis_on_the_second() else {
        return;
    };
    let url = format!("redis://redis.wsfan.test:{}", redis.port);
    let a =
        Wsfan::start_with_resolv_conf(&dns.resolv_conf, &["--redis", &url, "--log-level", "debug"]);
    eventually(10.0, "ready", || a.status("/readyz") == 200);
    let p = redis.port;
    assert!(
        a.log()
            .contains(&format!("resolved to [127.0.0.2:{p}, 127.0.0.3:{p}]")),
        "the refusing address was tried first: {}",
        a.log()
    );
    assert_eq!(a.metric("wsfan_redis_reconnects_total"), 0.0);
}

#[test]
fn a_lookup_that_never_answers_times_out_is_retried_and_leaves_no_zombies() {
    let Some(dns) = FakeDns::start(vec![std::net::Ipv4Addr::LOCALHOST]) else {
        return;
    };
    let a = Wsfan::start_with_resolv_conf(
        &dns.resolv_conf,
        &[
            "--redis",
            "redis://redis.wsfan.test:6390",
            "--redis-timeout",
            "0.5",
            "--redis-backoff-max",
            "0.3",
        ],
    );
    // Two timed-out attempts per link at least; identical failures are logged once.
    eventually(15.0, "lookups time out and are retried", || {
        a.metric("wsfan_redis_connect_failures_total") >= 4.0
    });
    assert_eq!(
        a.log().matches("resolving the host name timed out").count(),
        2,
        "one line per link for identical failures: {}",
        a.log()
    );
    assert_eq!(a.status("/healthz"), 200);
    let kids = children(a.child.id());
    assert!(
        kids.len() <= 2,
        "at most one lookup per link at a time: {kids:?}"
    );
    eventually(5.0, "stopped lookups reaped", || {
        children(a.child.id())
            .iter()
            .all(|&(_, state)| state != 'Z')
    });
    assert!(dns.queries() >= 4, "every attempt asked DNS again");
}

#[test]
fn a_name_without_addresses_is_retried_and_logged_with_the_reason() {
    let Some(dns) = FakeDns::start(vec![]) else {
        return;
    };
    dns.answer();
    let a = Wsfan::start_with_resolv_conf(
        &dns.resolv_conf,
        &[
            "--redis",
            "redis://redis.wsfan.test:6390",
            "--redis-backoff-max",
            "0.3",
        ],
    );
    eventually(10.0, "two failed lookups per link", || {
        a.metric("wsfan_redis_connect_failures_total") >= 4.0 && dns.queries() >= 4
    });
    assert!(
        a.log().contains("(resolve: redis.wsfan.test: "),
        "{}",
        a.log()
    );
    assert_eq!(a.status("/readyz"), 503);
}

#[test]
fn an_address_that_swallows_connects_does_not_hold_every_attempt() {
    let Some((dns, redis)) = two_addresses_redis_on_the_second() else {
        return;
    };
    // On 127.0.0.2, same port: a listener whose accept queue is full; the kernel drops
    // further SYNs, so a connect there neither succeeds nor is refused.
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let hole_addr: std::net::SocketAddr = format!("127.0.0.2:{}", redis.port).parse().unwrap();
    hole.bind(&hole_addr.into()).unwrap();
    hole.listen(0).unwrap();
    let _filler = std::net::TcpStream::connect(hole_addr).unwrap();
    let url = format!("redis://redis.wsfan.test:{}", redis.port);
    let a = Wsfan::start_with_resolv_conf(
        &dns.resolv_conf,
        &[
            "--redis",
            &url,
            "--redis-timeout",
            "0.5",
            "--redis-backoff-max",
            "0.3",
        ],
    );
    eventually(15.0, "ready through the second address", || {
        a.status("/readyz") == 200
    });
    assert!(
        a.log().contains("connect timed out"),
        "the silent address was tried first: {}",
        a.log()
    );
}
