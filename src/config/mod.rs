//! Configuration: every tunable limit lives here, with its default and why.
//!
//! Each flag `--name` can also be set by the environment variable `WSFAN_NAME`
//! (upper case, `-` → `_`); a flag on the command line wins over the environment.
//! Durations are seconds (`10`, `0.5`). An invalid value is a [`ConfigError`] that
//! names the flag; `main` prints it and exits with status 2.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod flags;
use flags::invalid;
pub use flags::{Dflt, Flag, FLAGS};

/// Everything the server needs to know at start-up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the HTTP/WebSocket listener. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Channel joined by an upgrade on `/` or `/ws`. Default `chat_messages`
    /// (the channel the Node `ws` + `ioredis` chat servers use, so both can share a Redis).
    pub default_channel: String,
    /// Serve static files from this folder instead of the copy compiled into the binary.
    pub static_dir: Option<PathBuf>,
    /// Open connections (HTTP and WebSocket) before new ones get HTTP 503. Default 10,000.
    pub max_connections: usize,
    /// Largest message a client may send, in bytes (after reassembly). Larger → close 1009.
    /// Also the largest delivered from Redis (a larger one is skipped and counted).
    /// Default 64 KiB.
    pub max_message_size: usize,
    /// Bytes that may wait in one connection's output queue. A client whose queue would
    /// grow past this is a slow consumer and is disconnected. Default 1 MiB.
    pub max_outbound_bytes: usize,
    /// A connection that has not finished its HTTP request / upgrade by then is dropped;
    /// also the idle limit of a plain HTTP keep-alive connection. Default 10 s.
    pub handshake_timeout: Duration,
    /// How long a graceful shutdown may flush before the process exits. Default 5 s.
    pub shutdown_timeout: Duration,
    /// Keepalive: a Ping is sent this often and a client that stays silent until the next
    /// one is dropped. Default 25 s (below common 30–60 s proxy idle timeouts).
    pub ping_interval: Duration,
    /// Sustained inbound messages per second allowed per connection. Default 1,000.
    pub max_messages_per_sec: u32,
    /// Token-bucket size: messages a connection may send in a burst. Default 2,000.
    pub max_messages_burst: u32,
    /// Log level filter (`error`, `warn`, `info`, `debug`, `trace`). Default `info`.
    pub log_level: log::LevelFilter,
    /// Redis (`redis://[user:pass@]host:port[/db]`, `unix:///path[?db=N]`), parsed.
    /// `None` runs standalone.
    pub redis: Option<crate::backplane::redis::target::Target>,
    /// `--redis-cluster`: seed nodes of a Redis Cluster (each `redis://host:port`).
    pub redis_cluster: Option<Vec<crate::backplane::redis::target::Target>>,
    /// Prefix prepended to channel names to form Redis channel names. Default empty.
    pub channel_prefix: String,
    /// Messages kept for publishing while Redis is unreachable. Default 10,000.
    pub redis_buffer_messages: usize,
    /// Bytes kept for publishing while Redis is unreachable. Default 16 MiB.
    pub redis_buffer_bytes: usize,
    /// Messages of history kept per channel (Redis stream `MAXLEN`, or in memory
    /// standalone); 0 turns history off (plain PUBLISH payloads). Default 10,000.
    pub history_size: usize,
    /// A channel's history expires this long after its last publish. Default 300 s.
    pub history_ttl: Duration,
    /// Bytes of fragmented messages being reassembled, over all connections; a
    /// connection whose next fragment would go over is closed with 1013 (try again
    /// later). Each is also bounded by `max_message_size`. Default 64 MiB.
    pub max_reassembly_bytes: usize,
    /// Channels one Centrifugo-protocol client may subscribe to at once. Default 128.
    pub max_channels_per_connection: usize,
    /// Live messages held while gaps are read, over all channels. Default 8 MiB.
    pub history_hold_bytes: usize,
    /// Standalone: bytes of history in memory over all channels. Default 64 MiB.
    pub history_memory_bytes: usize,
    /// How often each Redis link is PINGed. Default 3 s.
    pub redis_ping_interval: Duration,
    /// A PING unanswered this long marks the Redis link dead. Default 5 s, so a silent
    /// dead link is noticed within `redis_ping_interval + redis_timeout` (~8 s). Also
    /// the limit for one connect attempt, host-name lookup included.
    pub redis_timeout: Duration,
    /// Longest wait between Redis reconnect attempts (exponential backoff with jitter,
    /// starting at 100 ms). Default 5 s.
    pub redis_backoff_max: Duration,
    /// Browser origins allowed to upgrade. Empty (default): only an `Origin` whose host
    /// equals the request's `Host`; `*`: any. Requests without `Origin` are allowed.
    pub allowed_origins: Vec<String>,
    /// HS256 secret; when set, upgrades need a valid JWT in `?token=`. Default off.
    pub jwt_secret: Option<String>,
    /// Shared by every instance: history envelopes carry a tag made with it, and one
    /// without a valid tag is never delivered (closes forged next offsets). Off.
    pub history_key: Option<String>,
    /// Bearer key of `POST /publish/<channel>`; the endpoint is off (404) without it.
    pub api_key: Option<String>,
    /// Set `SO_REUSEPORT` so several processes share the port. Default off. Without
    /// `--redis` it needs `--standalone`: processes without a backplane don't share
    /// messages, so their clients would be split without a word.
    pub reuse_port: bool,
    /// No backplane, on purpose: with `--reuse-port`, each process is its own island.
    pub standalone: bool,
}

impl Default for Config {
    /// Every flag at its declared default (`FLAGS`), so a default is written once.
    fn default() -> Self {
        let mut cfg = Config::unset();
        for f in FLAGS {
            if let Dflt::Value(v) = f.default {
                // A declared default that does not parse is a bug caught by the tests.
                let _ = (f.set)(&mut cfg, f.name, v);
            }
        }
        cfg
    }
}

impl Config {
    /// Every field at its zero value: the starting point `FLAGS` defaults are applied to.
    fn unset() -> Config {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            default_channel: String::new(),
            static_dir: None,
            max_connections: 0,
            max_message_size: 0,
            max_outbound_bytes: 0,
            handshake_timeout: Duration::ZERO,
            shutdown_timeout: Duration::ZERO,
            ping_interval: Duration::ZERO,
            max_messages_per_sec: 0,
            max_messages_burst: 0,
            log_level: log::LevelFilter::Info,
            redis: None,
            redis_cluster: None,
            channel_prefix: String::new(),
            redis_buffer_messages: 0,
            redis_buffer_bytes: 0,
            history_size: 0,
            history_ttl: Duration::ZERO,
            history_hold_bytes: 0,
            history_memory_bytes: 0,
            max_reassembly_bytes: 0,
            max_channels_per_connection: 0,
            redis_ping_interval: Duration::ZERO,
            redis_timeout: Duration::ZERO,
            redis_backoff_max: Duration::ZERO,
            allowed_origins: Vec::new(),
            jwt_secret: None,
            history_key: None,
            api_key: None,
            reuse_port: false,
            standalone: false,
        }
    }
}

/// A flag or environment value that could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `--help` was asked for: print [`usage`] and exit 0.
    Help,
    /// `--version` was asked for: print the version and exit 0.
    Version,
    /// The named flag has a bad value or is unknown.
    Invalid { flag: String, reason: String },
    /// An argument that is not a flag.
    Unexpected(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Help => write!(f, "help requested"),
            ConfigError::Version => write!(f, "version requested"),
            ConfigError::Invalid { flag, reason } => write!(f, "invalid --{flag}: {reason}"),
            ConfigError::Unexpected(a) => write!(
                f,
                "unexpected argument {a:?}: every setting is a flag like --listen ADDR (see --help)"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The `--help` text.
pub fn usage() -> String {
    let mut s = String::from(
        "wsfan: WebSocket fan-out server (standalone, or scaled out through Redis Pub/Sub)\n\n\
         Usage: wsfan [OPTIONS]\n\nOptions (each also WSFAN_<NAME> in the environment):\n",
    );
    let width = FLAGS
        .iter()
        .map(|f| f.name.len() + 1 + f.hint.len())
        .max()
        .unwrap_or(0);
    let line = |s: &mut String, left: &str, help: &str| {
        s.push_str(&format!("  --{left:<width$}  {help}\n"));
    };
    for f in FLAGS {
        let help = format!("{} [default: {}]", f.help, f.default_text());
        line(&mut s, &format!("{} {}", f.name, f.hint), &help);
    }
    line(&mut s, "version", "print the version");
    line(&mut s, "help", "print this help");
    s
}

impl Config {
    /// Builds a config from command-line arguments (without the program name) and an
    /// environment lookup. Flags accept `--name value` and `--name=value`.
    pub fn parse<I, E>(args: I, env: E) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = String>,
        E: Fn(&str) -> Option<String>,
    {
        let mut values: Vec<(String, String)> = Vec::new();
        for f in FLAGS {
            let var = format!("WSFAN_{}", f.name.to_uppercase().replace('-', "_"));
            if let Some(v) = env(&var) {
                values.push((f.name.to_string(), v));
            }
        }
        let mut level_from_flag = false;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--help" || arg == "-h" {
                return Err(ConfigError::Help);
            }
            if arg == "--version" || arg == "-V" {
                return Err(ConfigError::Version);
            }
            let Some(body) = arg.strip_prefix("--") else {
                return Err(ConfigError::Unexpected(arg));
            };
            let name = body.split_once('=').map_or(body, |(n, _)| n).to_string();
            let Some(Flag { hint, .. }) = FLAGS.iter().find(|f| f.name == name) else {
                return Err(invalid(&name, "unknown flag (see --help)"));
            };
            // Switches take no value unless given as --name=value.
            if hint.is_empty() && !body.contains('=') {
                values.push((name, "true".to_string()));
                continue;
            }
            let value = match body.split_once('=') {
                Some((_, v)) => v.to_string(),
                None => args
                    .next()
                    .ok_or_else(|| invalid(&name, &format!("missing value (expected {hint})")))?,
            };
            level_from_flag |= name == "log-level";
            values.push((name, value));
        }
        let mut cfg = Config::default();
        if !level_from_flag {
            if let Some(level) = env("RUST_LOG") {
                if let Ok(l) = level.parse() {
                    cfg.log_level = l;
                }
            }
        }
        for (name, value) in values {
            cfg.set(&name, value.trim())?;
        }
        cfg.check()?;
        Ok(cfg)
    }

    fn set(&mut self, name: &str, v: &str) -> Result<(), ConfigError> {
        match FLAGS.iter().find(|f| f.name == name) {
            Some(f) => (f.set)(self, name, v),
            None => Err(invalid(name, "unknown flag (see --help)")),
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        // A close frame (≤ 127 bytes) must always fit in an empty queue.
        if self.max_outbound_bytes < 256 {
            return Err(invalid(
                "max-outbound-bytes",
                &format!("expected at least 256, got {}", self.max_outbound_bytes),
            ));
        }
        if self.reuse_port
            && self.redis.is_none()
            && self.redis_cluster.is_none()
            && !self.standalone
        {
            return Err(invalid(
                "reuse-port",
                "without --redis, processes sharing a port do not share messages: clients \
                 on different processes would not see each other. Add --redis URL, or \
                 --standalone if separate islands are what you want",
            ));
        }
        if self.standalone && self.redis.is_some() {
            return Err(invalid("standalone", "contradicts --redis: choose one"));
        }
        if let Some(seeds) = &self.redis_cluster {
            if self.redis.is_some() || self.standalone {
                return Err(invalid(
                    "redis-cluster",
                    "contradicts --redis and --standalone: choose one",
                ));
            }
            if self.channel_prefix.contains(['{', '}']) {
                return Err(invalid(
                    "channel-prefix",
                    "may not contain { or } with --redis-cluster (a channel's keys and shard channel must hash to one slot)",
                ));
            }
            if seeds.iter().any(|t| t.db != 0 || t.sentinel.is_some()) {
                return Err(invalid(
                    "redis-cluster",
                    "seeds are redis://[user:pass@]host[:port] (a cluster has only db 0)",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_names_the_flag_echoes_the_value_and_says_what_is_expected() {
        for (args, needles) in [
            (
                &["--listen", "nope:1"][..],
                &["--listen", "\"nope:1\"", "expected"][..],
            ),
            (
                &["--log-level", "loud"],
                &["--log-level", "\"loud\"", "expected"],
            ),
            (
                &["--max-connections", "-3"],
                &["--max-connections", "\"-3\"", "expected"],
            ),
            (
                &["--ping-interval", "x"],
                &["--ping-interval", "\"x\"", "expected"],
            ),
            (
                &["--default-channel", "a b"],
                &["--default-channel", "\"a b\"", "expected"],
            ),
            (
                &["--reuse-port=maybe"],
                &["--reuse-port", "\"maybe\"", "expected"],
            ),
            (
                &["--redis", "redis://u:secret@h:99999999"],
                &["--redis", "u:***@h:99999999", "expected"],
            ),
            (
                &["--redis", "http://x"],
                &["--redis", "\"http://x\"", "expected"],
            ),
        ] {
            let e = parse(args, &[]).unwrap_err().to_string();
            for n in needles {
                assert!(e.contains(n), "{args:?}: {e:?} lacks {n:?}");
            }
            assert!(!e.contains("secret"), "{e}");
            assert!(!e.contains("InvalidClientConfig"), "{e}");
        }
    }

    #[test]
    fn reuse_port_without_a_backplane_needs_standalone() {
        let e = parse(&["--reuse-port"], &[]).unwrap_err().to_string();
        assert!(e.contains("--redis") && e.contains("--standalone"), "{e}");
        assert!(parse(&["--reuse-port", "--standalone"], &[]).is_ok());
        assert!(parse(&["--reuse-port", "--redis", "redis://127.0.0.1"], &[]).is_ok());
        assert!(parse(&["--standalone", "--redis", "redis://127.0.0.1"], &[]).is_err());
    }

    #[test]
    fn every_declared_default_parses_and_defaults_are_sane() {
        for f in FLAGS {
            if let Dflt::Value(v) = f.default {
                let mut c = Config::unset();
                (f.set)(&mut c, f.name, v).unwrap_or_else(|e| panic!("{}: {e}", f.name));
            }
        }
        let c = Config::default();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.redis_buffer_bytes, 16 * 1024 * 1024);
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert!(c.check().is_ok());
    }

    /// The README's flags table lists exactly `FLAGS`, with the same defaults.
    #[test]
    fn the_readme_flag_table_matches_the_declared_flags() {
        let readme = include_str!("../../README.md");
        let rows: Vec<(String, String)> = readme
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (
                    cells[1]
                        .trim_matches('`')
                        .trim_start_matches("--")
                        .to_string(),
                    cells[2].trim_matches('`').to_string(),
                )
            })
            .collect();
        let declared: Vec<(String, String)> = FLAGS
            .iter()
            .map(|f| (f.name.to_string(), f.default_text().to_string()))
            .collect();
        assert_eq!(rows, declared, "README flags table vs config::FLAGS");
    }

    #[test]
    fn help_columns_line_up() {
        let u = usage();
        let cols: Vec<usize> = u
            .lines()
            .filter(|l| l.starts_with("  --"))
            .map(|l| {
                let gap = l[4..].find("  ").expect("two spaces before the help") + 4;
                gap + l[gap..].len() - l[gap..].trim_start().len()
            })
            .collect();
        assert!(
            cols.len() > 20 && cols.windows(2).all(|w| w[0] == w[1]),
            "{u}"
        );
    }

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(args.iter().map(|s| s.to_string()), move |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse(&[], &[]).unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.max_message_size, 65536);
        let c = parse(
            &["--listen", "127.0.0.1:0", "--handshake-timeout=0.5"],
            &[
                ("WSFAN_MAX_CONNECTIONS", "7"),
                ("WSFAN_LISTEN", "1.2.3.4:5"),
            ],
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:0");
        assert_eq!(c.handshake_timeout, Duration::from_millis(500));
        assert_eq!(c.max_connections, 7);
        let c = parse(
            &[
                "--reuse-port",
                "--standalone",
                "--allowed-origins",
                "https://a, https://b/",
            ],
            &[],
        )
        .unwrap();
        assert!(c.reuse_port);
        assert_eq!(c.allowed_origins, ["https://a", "https://b"]);
        let c = parse(
            &[],
            &[
                ("WSFAN_REUSE_PORT", "1"),
                ("WSFAN_STANDALONE", "yes"),
                ("WSFAN_API_KEY", "k"),
            ],
        )
        .unwrap();
        assert!(c.reuse_port);
        assert_eq!(c.api_key.as_deref(), Some("k"));
    }

    #[test]
    fn errors_name_the_flag() {
        for (args, flag) in [
            (&["--max-connections", "0"][..], "max-connections"),
            (&["--handshake-timeout", "-1"][..], "handshake-timeout"),
            (&["--listen", "nope"][..], "listen"),
            (&["--bogus", "1"][..], "bogus"),
            (&["--default-channel", "a b"][..], "default-channel"),
            (&["--redis", "http://x"][..], "redis"),
            (&["--max-message-size"][..], "max-message-size"),
        ] {
            match parse(args, &[]) {
                Err(ConfigError::Invalid { flag: f, .. }) => assert_eq!(f, flag),
                other => panic!("{args:?}: {other:?}"),
            }
        }
        assert!(matches!(
            parse(&["listen"], &[]),
            Err(ConfigError::Unexpected(a)) if a == "listen"
        ));
        assert_eq!(parse(&["--help"], &[]).unwrap_err(), ConfigError::Help);
        assert_eq!(
            parse(&["--version"], &[]).unwrap_err(),
            ConfigError::Version
        );
    }
}
