//! The `wsfan` binary: parse flags, set up logging, run.

use std::io::Write;
use wsfan::config::{usage, Config, ConfigError};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, host, port] = &args[..] {
        if flag == "--resolve" {
            // Internal: the Redis link's name lookup, run as a child process.
            std::process::exit(wsfan::backplane::redis::resolve_main(host, port));
        }
    }
    let cfg = match Config::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(ConfigError::Help) => {
            let _ = write!(std::io::stdout(), "{}", usage());
            return;
        }
        Err(ConfigError::Version) => {
            let _ = writeln!(std::io::stdout(), "wsfan {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Err(e) => {
            // Not eprintln!: it panics when stderr is a closed pipe.
            let _ = writeln!(std::io::stderr(), "wsfan: {e}");
            std::process::exit(2);
        }
    };
    wsfan::logging::init(cfg.log_level);
    if let Err(e) = wsfan::run(cfg) {
        log::error!("fatal: {e}");
        std::process::exit(1);
    }
}
