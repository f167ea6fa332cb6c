//! Where Redis is and how to log in, parsed from the `--redis` URL once (by `config`):
//! one Redis (`redis://`, `unix://`), or a primary found through Redis Sentinel
//! (`redis+sentinel://`). A leaf: the redis crate's URL parser and nothing of ours.

use redis::IntoConnectionInfo;
use std::path::PathBuf;

const EXPECTED_URL: &str = "expected redis://[user:pass@]host[:port][/db], unix:///path[?db=N] or redis+sentinel://[user:pass@]host[:port][,host[:port]…]/MASTER[/db]";

/// Sentinels a URL may name (each is asked in turn until one answers).
pub const MAX_SENTINELS: usize = 16;

/// Where Redis is and how to log in, from the `--redis` URL.
#[derive(Debug, Clone)]
pub struct Target {
    /// The Redis to use; with Sentinel, where the primary was last seen (a sentinel's
    /// first answer replaces it; until then it is unset, port 0).
    pub addr: Addr,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
    /// `redis+sentinel://`: the sentinels and the master's name; the credentials and
    /// db are the primary's (sentinels are asked without `AUTH`).
    pub sentinel: Option<Sentinel>,
}

/// The sentinels to ask and the name of the master they watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentinel {
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
}

#[derive(Debug, Clone)]
pub enum Addr {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl Target {
    /// Parses `redis://[user:pass@]host[:port][/db]` or `unix:///path[?db=N&pass=..]`.
    pub fn parse(url: &str) -> Result<Target, String> {
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            return Self::parse_sentinel(rest);
        }
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
            sentinel: None,
        })
    }

    /// `[user:pass@]host[:port][,host[:port]…]/MASTER[/db]` (after the scheme); port
    /// 26379 by default, IPv6 in brackets. Percent-escapes are not decoded.
    fn parse_sentinel(rest: &str) -> Result<Target, String> {
        let bad = |why: &str| format!("{why}; {EXPECTED_URL}");
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (hosts, path) = rest.split_once('/').ok_or_else(|| bad("no master name"))?;
        let mut parts = path.split('/');
        let master = parts.next().unwrap_or_default();
        if master.is_empty() || !master.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("no master name"));
        }
        let db = match parts.next() {
            None | Some("") => 0,
            Some(d) => d.parse::<i64>().map_err(|_| bad("db is not a number"))?,
        };
        if parts.next().is_some() {
            return Err(bad("too many path parts"));
        }
        let mut sentinels = Vec::new();
        for h in hosts.split(',') {
            let (host, port) = match h.rsplit_once(':') {
                Some((host, port)) if !port.contains(']') => (
                    host,
                    port.parse::<u16>()
                        .map_err(|_| bad(&format!("bad port in {h:?}")))?,
                ),
                _ => (h, 26379),
            };
            let host = host.trim_matches(['[', ']']);
            if host.is_empty() || port == 0 {
                return Err(bad(&format!("bad sentinel {h:?}")));
            }
            sentinels.push((host.to_string(), port));
        }
        if sentinels.len() > MAX_SENTINELS {
            return Err(bad(&format!("more than {MAX_SENTINELS} sentinels")));
        }
        let (username, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
                None => (Some(a.to_string()), None),
            },
        };
        Ok(Target {
            addr: Addr::Tcp(String::new(), 0),
            username,
            password,
            db,
            sentinel: Some(Sentinel {
                sentinels,
                master: master.to_string(),
            }),
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
        if let Some(s) = &self.sentinel {
            let hosts: Vec<String> = s
                .sentinels
                .iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect();
            let primary = match &self.addr {
                Addr::Tcp(h, p) if *p != 0 => format!(", primary {h}:{p}"),
                _ => String::new(),
            };
            return format!(
                "redis+sentinel://{auth}{}/{}/{}{primary}",
                hosts.join(","),
                s.master,
                self.db
            );
        }
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
        let t = Target::parse("redis+sentinel://:pw@10.0.0.1,[::1]:26380/mymaster/3").unwrap();
        let s = t.sentinel.clone().unwrap();
        assert_eq!(
            s.sentinels,
            vec![("10.0.0.1".to_string(), 26379), ("::1".to_string(), 26380)]
        );
        assert_eq!((s.master.as_str(), t.db), ("mymaster", 3));
        assert_eq!(t.password.as_deref(), Some("pw"));
        assert_eq!(
            t.display(),
            "redis+sentinel://:***@10.0.0.1:26379,::1:26380/mymaster/3"
        );
        for bad in [
            "redis+sentinel://h1,h2",
            "redis+sentinel://h1/",
            "redis+sentinel://h1:x/m",
            "redis+sentinel://,h2/m",
            "redis+sentinel://h1/m/db",
            "redis+sentinel://h1/m/1/2",
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
