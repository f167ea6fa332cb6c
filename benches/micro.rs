//! Micro-benchmarks of the hot paths, no sockets: `cargo bench --bench micro`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use wsfan::backplane::redis::resp::{Next, ReadBuf};
use wsfan::hub::{ConnId, Hub};
use wsfan::outq::OutQueue;
use wsfan::ws::{self, Kind};

/// Hub lookup + the same encoded frame queued on 10,000 members (what a delivery costs
/// before the writes).
fn fan_out(c: &mut Criterion) {
    let mut hub = Hub::new();
    for i in 0..10_000 {
        hub.join(ConnId(i), "room");
    }
    let mut queues: Vec<OutQueue> = (0..10_000).map(|_| OutQueue::default()).collect();
    let mut g = c.benchmark_group("fan_out");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("hub_10k_members_queue_shared_frame", |b| {
        b.iter(|| {
            let frame = ws::data_frame(Kind::Text, Bytes::from_static(&[b'x'; 64]));
            for m in hub.members("room") {
                queues[m.0].push(frame.clone());
            }
            for q in queues.iter_mut() {
                q.clear();
            }
        })
    });
    g.finish();
    c.bench_function("hub_join_leave", |b| {
        let mut h = Hub::new();
        let mut i = 0usize;
        b.iter(|| {
            h.join(ConnId(i % 1000), "a");
            h.leave_all(ConnId((i + 500) % 1000));
            i += 1;
        })
    });
}

fn frames(c: &mut Criterion) {
    let payload = Bytes::from(vec![b'a'; 64]);
    c.bench_function("encode_64B_text_frame", |b| {
        b.iter(|| ws::data_frame(Kind::Text, black_box(payload.clone())))
    });
    // 100 masked 64-byte client frames in one buffer.
    let mut wire = Vec::new();
    for _ in 0..100 {
        wire.extend_from_slice(&[0x81, 0x80 | 64, 1, 2, 3, 4]);
        wire.extend((0..64).map(|i| b'a' ^ [1, 2, 3, 4][i % 4]));
    }
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(100));
    g.bench_function("decode_100_client_frames", |b| {
        b.iter_batched(
            || wire.clone(),
            |mut buf| {
                let mut out = Vec::with_capacity(100);
                ws::Decoder::default()
                    .decode(&mut buf, 65536, &mut out)
                    .map(|_| out.len())
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn redis_pushes(c: &mut Criterion) {
    // 100 Pub/Sub message pushes as Redis sends them.
    let mut wire = Vec::new();
    for i in 0..100 {
        let payload = format!("message number {i:04} with some text to carry");
        wire.extend_from_slice(
            format!(
                "*3\r\n$7\r\nmessage\r\n$4\r\nroom\r\n${}\r\n{}\r\n",
                payload.len(),
                payload
            )
            .as_bytes(),
        );
    }
    let mut g = c.benchmark_group("redis");
    g.throughput(Throughput::Elements(100));
    g.bench_function("parse_100_message_pushes", |b| {
        b.iter(|| {
            let mut parser = redis::Parser::new();
            let mut reader = &wire[..];
            let mut n = 0;
            while parser.parse_value(&mut reader).is_ok() {
                n += 1;
            }
            assert_eq!(n, 100);
            n
        })
    });
    // What the subscription link does: read into its bounded buffer, frame with
    // `resp::scan`, hand each whole value to one long-lived parser.
    let mut parser = redis::Parser::new();
    g.bench_function("frame_and_parse_100_message_pushes", |b| {
        b.iter(|| {
            let mut rb = ReadBuf::new(64 * 1024);
            let mut reader = &wire[..];
            let mut n = 0;
            loop {
                match rb.frame() {
                    Ok(Next::Ready) => {
                        while let Some(v) = rb.parse_one(&mut parser) {
                            n += usize::from(v.is_ok());
                        }
                    }
                    Ok(Next::NeedMore) if rb.fill(&mut reader).unwrap_or(0) > 0 => {}
                    _ => break,
                }
            }
            assert_eq!(n, 100);
            n
        })
    });
    g.bench_function("pack_100_publish_commands", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(16 * 1024);
            for _ in 0..100 {
                redis::cmd("PUBLISH")
                    .arg("room")
                    .arg(&b"payload of a message"[..])
                    .write_packed_command(&mut out);
            }
            out.len()
        })
    });
    g.finish();
}

fn http_heads(c: &mut Criterion) {
    let req = b"GET /ws/room HTTP/1.1\r\nHost: example.com:8080\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nOrigin: http://example.com:8080\r\n\
        User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120\r\n\r\n";
    c.bench_function("parse_upgrade_head", |b| {
        b.iter(|| {
            wsfan::http::parse_head(black_box(req))
                .ok()
                .flatten()
                .map(|h| h.len)
        })
    });
    let head = wsfan::http::parse_head(req).ok().flatten();
    c.bench_function("upgrade_response", |b| {
        b.iter(|| head.as_ref().and_then(|h| h.upgrade_response()))
    });
}

criterion_group!(benches, fan_out, frames, redis_pushes, http_heads);
criterion_main!(benches);
