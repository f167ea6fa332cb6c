//! The `wsfan` binary: parse flags, set up logging, run.

use wsfan::config::{usage, Config, ConfigError};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, host, port] = &args[..] {
        if flag == "--resolve" {
            // Internal: the Redis link's name lookup, run as a child process.
            std::process::exit(wsfan::redis_link::resolve_main(host, port));
        }
    }
    let cfg = match Config::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(ConfigError::Help) => {
            print!("{}", usage());
            return;
        }
        Err(ConfigError::Version) => {
            println!("wsfan {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Err(e) => {
            eprintln!("wsfan: {e}");
            std::process::exit(2);
        }
    };
    let _ = simple_logger::SimpleLogger::new()
        .with_level(cfg.log_level)
        .init();
    if let Err(e) = wsfan::run(cfg) {
        log::error!("fatal: {e}");
        std::process::exit(1);
    }
}
