//! The flags, each declared once: name, value hint, default, help and parser. `--help`,
//! `Config::default()` and the README's table (checked by a test) come from `FLAGS`.

use super::{Config, ConfigError};
use std::path::PathBuf;
use std::time::Duration;

/// A flag's default: a value applied through its parser, or "not set" with what that
/// means (for `--help` and the README).
#[derive(Debug, Clone, Copy)]
pub enum Dflt {
    Value(&'static str),
    Unset(&'static str),
}

/// One flag, declared once: name, value hint, default, help, parser. `--help`,
/// `Config::default()` and the README table (checked by a test) all come from `FLAGS`.
pub struct Flag {
    pub name: &'static str,
    /// Shown after the name in `--help`; empty for a switch (no value).
    pub hint: &'static str,
    pub default: Dflt,
    pub help: &'static str,
    pub(super) set: fn(&mut Config, &str, &str) -> Result<(), ConfigError>,
}

impl Flag {
    /// The default as `--help` and the README show it.
    pub fn default_text(&self) -> &'static str {
        match self.default {
            Dflt::Value(v) | Dflt::Unset(v) => v,
        }
    }
}

/// The flags, in `--help` order.
pub const FLAGS: &[Flag] = &[
    Flag {
        name: "listen",
        hint: "ADDR",
        default: Dflt::Value("0.0.0.0:8080"),
        help: "address to listen on",
        set: |c, n, v| {
            c.listen = v.parse().map_err(|_| {
                invalid(n, &format!("expected IP:PORT like 0.0.0.0:8080 or [::]:8080, got {v:?}"))
            })?;
            Ok(())
        },
    },
    Flag {
        name: "default-channel",
        hint: "NAME",
        default: Dflt::Value("chat_messages"),
        help: "channel for upgrades on / and /ws",
        set: |c, n, v| {
            if !crate::hub::valid_channel_name(v) {
                return Err(invalid(n, &format!("expected 1-128 bytes of A-Za-z0-9_.:-, got {v:?}")));
            }
            c.default_channel = v.to_string();
            Ok(())
        },
    },
    Flag {
        name: "static-dir",
        hint: "DIR",
        default: Dflt::Unset("built in"),
        help: "serve static files from DIR instead of the compiled-in static/",
        set: |c, n, v| {
            let p = PathBuf::from(v);
            if !p.is_dir() {
                return Err(invalid(n, &format!("{v:?} is not a directory")));
            }
            c.static_dir = Some(p);
            Ok(())
        },
    },
    Flag {
        name: "max-connections",
        hint: "N",
        default: Dflt::Value("10000"),
        help: "open connections; more get 503",
        set: |c, n, v| {
            c.max_connections = positive(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "max-message-size",
        hint: "BYTES",
        default: Dflt::Value("65536"),
        help: "largest message; a client's larger closes 1009, one from Redis is skipped and counted",
        set: |c, n, v| {
            c.max_message_size = positive(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "max-channels-per-connection",
        hint: "N",
        default: Dflt::Value("128"),
        help: "channels one /connection/websocket client may subscribe to at once (error 106 beyond)",
        set: |c, n, v| {
            c.max_channels_per_connection = positive(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "max-reassembly-bytes",
        hint: "BYTES",
        default: Dflt::Value("67108864"),
        help: "fragmented messages being reassembled, over all connections; one that would go over closes 1013",
        set: |c, n, v| {
            c.max_reassembly_bytes = positive(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "max-outbound-bytes",
        hint: "BYTES",
        default: Dflt::Value("1048576"),
        help: "output queued per connection (+32 per frame) after writing what the kernel takes; more: slow consumer, 1008",
        set: |c, n, v| {
            c.max_outbound_bytes = positive(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "handshake-timeout",
        hint: "SECS",
        default: Dflt::Value("10"),
        help: "time to complete a request/upgrade; also the HTTP keep-alive idle limit",
        set: |c, n, v| {
            c.handshake_timeout = secs(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "shutdown-timeout",
        hint: "SECS",
        default: Dflt::Value("5"),
        help: "how long a graceful shutdown may flush",
        set: |c, n, v| {
            c.shutdown_timeout = secs(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "ping-interval",
        hint: "SECS",
        default: Dflt::Value("25"),
        help: "keepalive ping period; a client silent for a whole period is dropped",
        set: |c, n, v| {
            c.ping_interval = secs(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "max-messages-per-sec",
        hint: "N",
        default: Dflt::Value("1000"),
        help: "sustained messages/s per connection (pings and pongs count); over: close 1008",
        set: |c, n, v| {
            c.max_messages_per_sec = positive(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "max-messages-burst",
        hint: "N",
        default: Dflt::Value("2000"),
        help: "burst size of that token bucket",
        set: |c, n, v| {
            c.max_messages_burst = positive(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "log-level",
        hint: "LEVEL",
        default: Dflt::Value("info"),
        help: "off|error|warn|info|debug|trace (RUST_LOG also works)",
        set: |c, n, v| {
            c.log_level = v.parse().map_err(|_| {
                invalid(n, &format!("expected one of off|error|warn|info|debug|trace, got {v:?}"))
            })?;
            Ok(())
        },
    },
    Flag {
        name: "redis",
        hint: "URL",
        default: Dflt::Unset("standalone"),
        help: "redis://[user:pass@]host[:port][/db], unix:///path[?db=N], or redis+sentinel://[user:pass@]h1[:port],h2…/MASTER[/db]",
        set: |c, n, v| {
            let target = crate::backplane::redis::target::Target::parse(v)
                .map_err(|e| invalid(n, &format!("{e}, got {:?}", redact_url(v))))?;
            c.redis = Some(target);
            Ok(())
        },
    },
    Flag {
        name: "redis-cluster",
        hint: "URL,..",
        default: Dflt::Unset("off"),
        help: "seed nodes of a Redis Cluster (redis://[user:pass@]host[:port], comma-separated): sharded Pub/Sub, one link pair per primary",
        set: |c, n, v| {
            let mut seeds = Vec::new();
            for url in v.split(',').map(str::trim).filter(|u| !u.is_empty()) {
                let t = crate::backplane::redis::target::Target::parse(url)
                    .map_err(|e| invalid(n, &format!("{e}, got {:?}", redact_url(url))))?;
                seeds.push(t);
            }
            if seeds.is_empty() || seeds.len() > 16 {
                return Err(invalid(n, "1 to 16 seed URLs, comma-separated"));
            }
            c.redis_cluster = Some(seeds);
            Ok(())
        },
    },
    Flag {
        name: "channel-prefix",
        hint: "STR",
        default: Dflt::Unset("empty"),
        help: "Redis channel = prefix + channel",
        set: |c, _, v| {
            c.channel_prefix = v.to_string();
            Ok(())
        },
    },
    Flag {
        name: "redis-buffer-messages",
        hint: "N",
        default: Dflt::Value("10000"),
        help: "publishes buffered for Redis: in an outage the oldest are dropped beyond it; while Redis works, clients wait (backpressure)",
        set: |c, n, v| {
            c.redis_buffer_messages = positive(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "redis-buffer-bytes",
        hint: "BYTES",
        default: Dflt::Value("16777216"),
        help: "bytes buffered for Redis (same rules as --redis-buffer-messages)",
        set: |c, n, v| {
            c.redis_buffer_bytes = positive(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "history-size",
        hint: "N",
        default: Dflt::Value("10000"),
        help: "messages of history kept per channel, for gap repair; 0: plain PUBLISH, no history",
        set: |c, n, v| {
            c.history_size = v.parse().map_err(|_| {
                invalid(n, &format!("expected a whole number (0 turns history off), got {v:?}"))
            })?;
            Ok(())
        },
    },
    Flag {
        name: "history-ttl",
        hint: "SECS",
        default: Dflt::Value("300"),
        help: "seconds a quiet channel's history is kept",
        set: |c, n, v| {
            c.history_ttl = secs(n, v)?.max(std::time::Duration::from_secs(1));
            Ok(())
        },
    },
    Flag {
        name: "history-hold-bytes",
        hint: "BYTES",
        default: Dflt::Value("8388608"),
        help: "live messages held while a gap is read from history (beyond: read later from history)",
        set: |c, n, v| {
            c.history_hold_bytes = positive(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "history-memory-bytes",
        hint: "BYTES",
        default: Dflt::Value("67108864"),
        help: "standalone: history kept in memory over all channels (beyond: oldest channel's dropped)",
        set: |c, n, v| {
            c.history_memory_bytes = positive(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "redis-ping-interval",
        hint: "SECS",
        default: Dflt::Value("3"),
        help: "PING period on each Redis link",
        set: |c, n, v| {
            c.redis_ping_interval = secs(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "redis-timeout",
        hint: "SECS",
        default: Dflt::Value("5"),
        help: "unanswered PING, or connect/login (host-name lookup included) not done: link dead",
        set: |c, n, v| {
            c.redis_timeout = secs(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "redis-backoff-max",
        hint: "SECS",
        default: Dflt::Value("5"),
        help: "reconnect backoff cap (from 100 ms, doubling, jittered; reset once a link answered a periodic PING)",
        set: |c, n, v| {
            c.redis_backoff_max = secs(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "allowed-origins",
        hint: "LIST",
        default: Dflt::Unset("same host"),
        help: "comma-separated browser origins or *; a refused Origin gets 403",
        set: |c, _, v| {
            c.allowed_origins = v
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect();
            Ok(())
        },
    },
    Flag {
        name: "history-key",
        hint: "SECRET",
        default: Dflt::Unset("off"),
        help: "16-64 bytes shared by every instance: history envelopes are authenticated, forged ones never delivered",
        set: |c, n, v| {
            if crate::envelope::HistoryKey::new(v.as_bytes()).is_none() {
                return Err(invalid(n, "expected 16 to 64 bytes"));
            }
            c.history_key = Some(v.to_string());
            Ok(())
        },
    },
    Flag {
        name: "jwt-secret",
        hint: "SECRET",
        default: Dflt::Unset("off"),
        help: "require an HS256 JWT in ?token= for upgrades",
        set: |c, n, v| {
            c.jwt_secret = non_empty(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "api-key",
        hint: "KEY",
        default: Dflt::Unset("off"),
        help: "enables POST /publish/<channel> with Authorization: Bearer <key>",
        set: |c, n, v| {
            c.api_key = non_empty(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "reuse-port",
        hint: "",
        default: Dflt::Unset("off"),
        help: "SO_REUSEPORT: one process per core on one port; needs --redis (or --standalone)",
        set: |c, n, v| {
            c.reuse_port = switch(n, v)?;
            Ok(())
        },
    },
    Flag {
        name: "standalone",
        hint: "",
        default: Dflt::Unset("off"),
        help: "no backplane, on purpose: with --reuse-port each process is a separate island",
        set: |c, n, v| {
            c.standalone = switch(n, v)?;
            Ok(())
        },
    },
];

pub(super) fn invalid(flag: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        flag: flag.trim_start_matches('-').to_string(),
        reason: reason.to_string(),
    }
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(
    name: &str,
    v: &str,
) -> Result<T, ConfigError> {
    match v.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err(invalid(
            name,
            &format!("expected a positive whole number, got {v:?}"),
        )),
    }
}

fn switch(name: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(invalid(
            name,
            &format!("expected true or false (or no value), got {v:?}"),
        )),
    }
}

/// A Redis URL for an error message: the password, if any, is not shown.
fn redact_url(v: &str) -> String {
    match (v.find("://"), v.rfind('@')) {
        (Some(s), Some(at)) if at > s => match v[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &v[..s + 3], &v[at..]),
            None => v.to_string(),
        },
        _ => v.to_string(),
    }
}

fn non_empty(name: &str, v: &str) -> Result<Option<String>, ConfigError> {
    if v.is_empty() {
        return Err(invalid(name, "must not be empty"));
    }
    Ok(Some(v.to_string()))
}

fn secs(name: &str, v: &str) -> Result<Duration, ConfigError> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Duration::from_secs_f64(s)),
        _ => Err(invalid(name, &format!("expected seconds > 0, got {v:?}"))),
    }
}
