//! A wsfan process under test: started on a free port, its log collected, killed on drop
//! (or, for the bench, stopped with SIGTERM first so a wrapping profiler can write its
//! output).

use super::{eventually, http, rss_kb};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running wsfan process; killed on drop.
pub struct Wsfan {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    /// On drop: SIGTERM and up to 10 s to exit, then SIGKILL (see `graceful`).
    graceful: bool,
}

impl Wsfan {
    /// Starts wsfan on a free port with `args` (plus `--listen 127.0.0.1:0` unless given).
    pub fn start(args: &[&str]) -> Wsfan {
        Self::start_env(args, &[])
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Wsfan {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_wsfan")), args, env)
    }

    /// Starts wsfan under a tool given as words, e.g. `valgrind --tool=callgrind`
    /// (`WSFAN_BENCH_WRAP`); an empty `wrap` starts it plainly.
    pub fn start_wrapped(wrap: &str, args: &[&str]) -> Wsfan {
        let mut words = wrap.split_whitespace();
        let cmd = match words.next() {
            Some(tool) => {
                let mut c = Command::new(tool);
                c.args(words).arg(env!("CARGO_BIN_EXE_wsfan"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_wsfan")),
        };
        Self::spawn(cmd, args, &[])
    }

    /// Stop with SIGTERM on drop (graceful shutdown, profilers write their output),
    /// SIGKILL only if it is still running 10 s later.
    pub fn graceful(mut self) -> Wsfan {
        self.graceful = true;
        self
    }

    /// Starts wsfan in a private mount namespace where `/etc/resolv.conf` is `resolv_conf`
    /// (needs root: `unshare -m`). wsfan itself is the child (sh execs it).
    pub fn start_with_resolv_conf(resolv_conf: &std::path::Path, args: &[&str]) -> Wsfan {
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /etc/resolv.conf && exec \"$0\" \"$@\"",
                resolv_conf.display()
            ))
            .arg(env!("CARGO_BIN_EXE_wsfan"));
        Self::spawn(cmd, args, &[])
    }

    fn spawn(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> Wsfan {
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(args).env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wsfan");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                if std::env::var_os("WSFAN_TEST_LOG").is_some() {
                    eprintln!("[wsfan] {line}");
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => panic!("wsfan did not start: {}", log.lock().unwrap()),
        };
        Wsfan {
            child,
            addr,
            log,
            graceful: false,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_log(&self, needle: &str, secs: f64) {
        eventually(secs, &format!("log line containing {needle:?}"), || {
            self.log().contains(needle)
        });
    }

    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.child.id())
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    pub fn wait_exit(&mut self, secs: f64) -> ExitStatus {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < end, "wsfan did not exit within {secs} s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// GET /metrics, parsed into (series, value) pairs.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let (status, _, body) = http(
            self.addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status, 200);
        String::from_utf8(body)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .into_iter()
            .find(|(k, _)| k == series)
            .unwrap_or_else(|| panic!("no metric {series}"))
            .1
    }

    pub fn status(&self, path: &str) -> u16 {
        http(
            self.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .0
    }
}

impl Drop for Wsfan {
    fn drop(&mut self) {
        if self.graceful {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
