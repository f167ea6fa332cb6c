//! Counters kept as plain integers in the loop; rendered as Prometheus text only when
//! `/metrics` is scraped.

use crate::backplane::BusStats;
use crate::conn::Reason;
use crate::outq::WriteStats;
use std::fmt::Write;
use std::time::Duration;

/// Why an HTTP request or upgrade was refused (`wsfan_handshake_rejections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    BadRequest,
    BadChannel,
    Origin,
    Unauthorized,
    Forbidden,
    TooManyConnections,
    RedisUnavailable,
    Timeout,
}

impl Rejection {
    pub const ALL: [Rejection; 8] = [
        Rejection::BadRequest,
        Rejection::BadChannel,
        Rejection::Origin,
        Rejection::Unauthorized,
        Rejection::Forbidden,
        Rejection::TooManyConnections,
        Rejection::RedisUnavailable,
        Rejection::Timeout,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Rejection::BadRequest => "bad_request",
            Rejection::BadChannel => "bad_channel",
            Rejection::Origin => "origin",
            Rejection::Unauthorized => "unauthorized",
            Rejection::Forbidden => "forbidden",
            Rejection::TooManyConnections => "too_many_connections",
            Rejection::RedisUnavailable => "redis_unavailable",
            Rejection::Timeout => "timeout",
        }
    }
}

/// Upper bounds (seconds) of the loop-iteration histogram buckets.
const BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_total: u64,
    pub rejections: [u64; Rejection::ALL.len()],
    pub messages_received: u64,
    pub messages_delivered: u64,
    /// Write calls and bytes on client sockets, counted by the output queues.
    pub writes: WriteStats,
    pub disconnects: [u64; Reason::ALL.len()],
    loop_buckets: [u64; BUCKETS.len()],
    loop_count: u64,
    loop_sum: f64,
}

/// The counters the periodic log summary compares against.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub connections_total: u64,
    pub rejections: [u64; Rejection::ALL.len()],
    pub disconnects: [u64; Reason::ALL.len()],
}

impl Metrics {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connections_total: self.connections_total,
            rejections: self.rejections,
            disconnects: self.disconnects,
        }
    }

    pub fn reject(&mut self, r: Rejection) {
        self.rejections[r as usize] += 1;
    }

    pub fn disconnect(&mut self, r: Reason) {
        self.disconnects[r as usize] += 1;
    }

    pub fn loop_iteration(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        self.loop_count += 1;
        self.loop_sum += s;
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.loop_buckets[i] += 1;
            }
        }
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, connections: usize, channels: usize, bus: &BusStats) -> String {
        let plain: [(&str, &str, &str, u64); 33] = [
            (
                "wsfan_connections",
                "gauge",
                "Open connections (HTTP and WebSocket).",
                connections as u64,
            ),
            (
                "wsfan_connections_total",
                "counter",
                "Connections accepted.",
                self.connections_total,
            ),
            (
                "wsfan_messages_received_total",
                "counter",
                "Messages received from WebSocket clients and the publish API.",
                self.messages_received,
            ),
            (
                "wsfan_messages_published_total",
                "counter",
                "Messages handed to the backplane (Redis PUBLISH, or local).",
                bus.published,
            ),
            (
                "wsfan_messages_delivered_total",
                "counter",
                "Messages queued to WebSocket clients (one per recipient).",
                self.messages_delivered,
            ),
            (
                "wsfan_bytes_sent_total",
                "counter",
                "Bytes written to client sockets.",
                self.writes.bytes,
            ),
            (
                "wsfan_write_calls_total",
                "counter",
                "write/writev calls on client sockets.",
                self.writes.writes,
            ),
            (
                "wsfan_channels",
                "gauge",
                "Channels with local members.",
                channels as u64,
            ),
            (
                "wsfan_redis_up",
                "gauge",
                "1 while the Redis links are up and subscribed (1 standalone).",
                u64::from(bus.up),
            ),
            (
                "wsfan_redis_reconnects_total",
                "counter",
                "Redis link reconnects.",
                bus.reconnects,
            ),
            (
                "wsfan_redis_buffer_messages",
                "gauge",
                "Messages waiting to be published to Redis.",
                bus.buffered_messages as u64,
            ),
            (
                "wsfan_redis_buffer_bytes",
                "gauge",
                "Bytes waiting to be published to Redis.",
                bus.buffered_bytes as u64,
            ),
            (
                "wsfan_redis_buffer_dropped_total",
                "counter",
                "Messages dropped because the outage buffer was full.",
                bus.dropped,
            ),
            (
                "wsfan_redis_oversize_dropped_total",
                "counter",
                "Messages from Redis larger than --max-message-size, not delivered.",
                bus.oversize,
            ),
            (
                "wsfan_redis_connect_failures_total",
                "counter",
                "Redis connect attempts that failed before the link came up.",
                bus.connect_failures,
            ),
            (
                "wsfan_redis_publish_abandoned_total",
                "counter",
                "Publishes dropped after being sent to Redis 3 times without a reply.",
                bus.publish_abandoned,
            ),
            (
                "wsfan_history_resets_total",
                "counter",
                "Channels whose history began again with a new epoch (Redis lost it).",
                bus.history.resets,
            ),
            (
                "wsfan_history_forks_total",
                "counter",
                "Channels whose history forked: another Redis took over (a promoted replica, a restart) and delivery went on in a new epoch.",
                bus.history.forks,
            ),
            (
                "wsfan_history_fork_lost_total",
                "counter",
                "Messages delivered here past a fork: the old Redis's tail, not in the new one's history.",
                bus.history.fork_lost,
            ),
            (
                "wsfan_history_repaired_total",
                "counter",
                "Messages delivered from history to fill a gap.",
                bus.history.repaired,
            ),
            (
                "wsfan_history_missed_total",
                "counter",
                "Messages in a gap that history no longer held (lost).",
                bus.history.missed,
            ),
            (
                "wsfan_history_duplicates_total",
                "counter",
                "Messages dropped because their offset was already delivered.",
                bus.history.duplicates,
            ),
            (
                "wsfan_history_reads_total",
                "counter",
                "History reads sent to fill gaps.",
                bus.history.reads,
            ),
            (
                "wsfan_history_hold_overflows_total",
                "counter",
                "Live messages not held (hold limit) and read from history later.",
                bus.history.hold_overflows,
            ),
            (
                "wsfan_history_unconfirmed_total",
                "counter",
                "Live messages whose claimed position history did not confirm (forged, or of a lost history): dropped.",
                bus.history.unconfirmed,
            ),
            (
                "wsfan_history_forged_total",
                "counter",
                "With --history-key: positioned envelopes without a valid tag, never delivered.",
                bus.history.forged,
            ),
            (
                "wsfan_history_read_refused_total",
                "counter",
                "History reads Redis refused or answered with nonsense (one channel each).",
                bus.history.read_refused,
            ),
            (
                "wsfan_history_conflicts_total",
                "counter",
                "Held live copies that differed from history at their offset (history's was delivered).",
                bus.history.conflicts,
            ),
            (
                "wsfan_history_corrupt_dedupe_total",
                "counter",
                "Dedupe values beyond anything this instance sent, overwritten.",
                bus.history.corrupt_dedupe,
            ),
            (
                "wsfan_history_corrupt_meta_total",
                "counter",
                "History meta hashes wsfan did not write, replaced by a new epoch.",
                bus.history.corrupt_meta,
            ),
            (
                "wsfan_history_held_bytes",
                "gauge",
                "Bytes of live messages held while gaps are read.",
                bus.held_bytes as u64,
            ),
            (
                "wsfan_history_memory_bytes",
                "gauge",
                "Standalone: bytes of history kept in memory.",
                bus.history_bytes as u64,
            ),
            (
                "wsfan_log_lines_dropped_total",
                "counter",
                "Log lines not written because stderr was full or gone.",
                crate::logging::dropped_lines(),
            ),
        ];
        let mut s = String::with_capacity(4096);
        for (name, kind, help, v) in plain {
            let _ = write!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        }
        let rejections = Rejection::ALL.map(|r| (r.label(), self.rejections[r as usize]));
        labeled(
            &mut s,
            "wsfan_handshake_rejections_total",
            "Requests and upgrades refused, by reason.",
            &rejections,
        );
        let refused: Vec<(&str, u64)> = crate::backplane::REFUSED_REASONS
            .iter()
            .zip(bus.publish_refused)
            .map(|(l, n)| (*l, n))
            .collect();
        labeled(
            &mut s,
            "wsfan_redis_publish_refused_total",
            "Publishes Redis refused for good (not retried), by reason.",
            &refused,
        );
        let disconnects = Reason::ALL.map(|r| (r.label(), self.disconnects[r as usize]));
        labeled(
            &mut s,
            "wsfan_disconnects_total",
            "Connections ended, by reason.",
            &disconnects,
        );
        let h = "wsfan_loop_iteration_seconds";
        let _ = write!(
            s,
            "# HELP {h} Time spent handling one poll wake-up.\n# TYPE {h} histogram\n"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(s, "{h}_bucket{{le=\"{b}\"}} {}", self.loop_buckets[i]);
        }
        let _ = writeln!(s, "{h}_bucket{{le=\"+Inf\"}} {}", self.loop_count);
        let _ = writeln!(s, "{h}_sum {}", self.loop_sum);
        let _ = writeln!(s, "{h}_count {}", self.loop_count);
        s
    }
}

/// A counter family with one `reason` label.
fn labeled(s: &mut String, name: &str, help: &str, values: &[(&str, u64)]) {
    let _ = write!(s, "# HELP {name} {help}\n# TYPE {name} counter\n");
    for (label, v) in values {
        let _ = writeln!(s, "{name}{{reason=\"{label}\"}} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_with_help_and_type() {
        let mut m = Metrics::default();
        m.reject(Rejection::Origin);
        m.disconnect(Reason::SlowConsumer);
        m.loop_iteration(Duration::from_micros(300));
        let text = m.render(3, 2, &BusStats::default());
        assert!(text.contains("wsfan_connections 3\n"));
        assert!(text.contains("wsfan_handshake_rejections_total{reason=\"origin\"} 1\n"));
        assert!(text.contains("wsfan_disconnects_total{reason=\"slow_consumer\"} 1\n"));
        assert!(text.contains("wsfan_loop_iteration_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("wsfan_loop_iteration_seconds_bucket{le=\"0.00025\"} 0\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {base} ")),
                "{name} has no TYPE"
            );
        }
    }
}
