//! Where Redis is and how to log in, parsed from the `--redis` URL once (by `config`).
//! A leaf: the redis crate's URL parser and nothing of ours.

use redis::IntoConnectionInfo;
use std::path::PathBuf;

const EXPECTED_URL: &str = "expected redis://[user:pass@]host[:port][/db] or unix:///path[?db=N]";

/// Where Redis is and how to log in, from the `--redis` URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: Addr,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

#[derive(Debug, Clone)]
pub enum Addr {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl Target {
    /// Parses `redis://[user:pass@]host[:port][/db]` or `unix:///path[?db=N&pass=..]`.
    pub fn parse(url: &str) -> Result<Target, String> {
        if !(url.starts_with("redis://")
            || url.starts_with("unix://")
            || url.starts_with("redis+unix://"))
        {
            return Err(EXPECTED_URL.to_string());
        }
        // The redis crate's own error text names its types; ours says what is expected.
        let info = url
            .into_connection_info()
            .map_err(|_| EXPECTED_URL.to_string())?;
        let addr = match info.addr() {
            redis::ConnectionAddr::Tcp(h, p) => {
                Addr::Tcp(h.trim_matches(['[', ']']).to_string(), *p)
            }
            redis::ConnectionAddr::Unix(p) => Addr::Unix(p.clone()),
            _ => return Err("TLS (rediss://) is not supported".to_string()),
        };
        let r = info.redis_settings();
        Ok(Target {
            addr,
            username: r.username().map(str::to_string),
            password: r.password().map(str::to_string),
            db: r.db(),
        })
    }

    /// For logs: the password is never shown.
    pub fn display(&self) -> String {
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(_)) => format!("{u}:***@"),
            (None, Some(_)) => ":***@".to_string(),
            (Some(u), None) => format!("{u}@"),
            (None, None) => String::new(),
        };
        match &self.addr {
            Addr::Tcp(h, p) => format!("redis://{auth}{h}:{p}/{}", self.db),
            Addr::Unix(p) => format!("unix://{}?db={}", p.display(), self.db),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_passwords_are_redacted() {
        let t = Target::parse("redis://user:secret@10.0.0.1:6380/2").unwrap();
        assert_eq!(t.display(), "redis://user:***@10.0.0.1:6380/2");
        assert!(!t.display().contains("secret"));
        let t = Target::parse("redis://localhost").unwrap();
        assert_eq!(t.display(), "redis://localhost:6379/0");
        let t = Target::parse("unix:///run/redis.sock?db=3").unwrap();
        assert_eq!(t.display(), "unix:///run/redis.sock?db=3");
        for bad in [
            "http://x",
            "redis//x",
            "",
            "rediss://x:1",
            "redis://:99999999",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
