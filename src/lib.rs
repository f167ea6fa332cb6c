//! wsfan: a single-threaded WebSocket fan-out server that scales out through Redis
//! Pub/Sub.
//!
//! Module map (one concern each):
//!
//! | module          | owns                                                         |
//! |-----------------|--------------------------------------------------------------|
//! | [`config`]      | every flag/env setting, its default and validation           |
//! | [`server`]      | the mio poll loop: accept, read, fan-out, flush, timers      |
//! | [`conn`]        | one connection's state and phases                            |
//! | [`hub`]         | sans-IO channel registry (channel ⇄ connections)              |
//! | [`bus`]         | the backplane seam: in-memory (standalone) or Redis          |
//! | [`redis_link`]  | Redis Pub/Sub links in the same poller; RESP framing with a  |
//! |                 | size cap (`resp`); host-name lookup in a child process        |
//! | [`envelope`]    | how a message's kind travels inside a Redis payload          |
//! | [`ws`]          | sans-IO WebSocket frame decoding and server frame encoding   |
//! | [`http`]        | sans-IO HTTP request heads and responses                      |
//! | [`outq`]        | per-connection output queue of shared frames (writev)       |
//! | [`static_files`]| the web client, compiled in or from `--static-dir`           |
//! | [`metrics`]     | counters and the Prometheus text page                        |
//! | [`jwt`]         | HS256 token checks for upgrades                              |
//! | [`limits`]      | raising the open-files limit                                 |
//! | [`logging`]     | log lines to stderr that never block or crash the loop      |
//! | [`listen`]      | the listening socket (`SO_REUSEPORT`)                        |
//! | [`notify`]      | systemd `READY=1` / `STOPPING=1`                             |

pub mod backplane;
pub mod bus;
pub mod config;
pub mod conn;
pub mod envelope;
pub mod http;
pub mod hub;
pub mod jwt;
pub mod limits;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod outq;
pub mod redis_link;
pub mod redis_target;
pub mod server;
pub mod static_files;
pub mod token;
pub mod ws;

pub use config::Config;
pub use server::Server;

/// Binds and runs a server until it shuts down (signals READY to systemd when ready).
pub fn run(cfg: Config) -> std::io::Result<()> {
    limits::raise_nofile(cfg.max_connections);
    let mut server = Server::bind(cfg)?;
    server.on_ready(Box::new(|| notify::send("READY=1")));
    server.run()
}
