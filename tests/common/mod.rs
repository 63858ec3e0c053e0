//! Starting the real `anomalyd` binary on loopback and talking to it.

#![allow(dead_code)] // each test file uses its own subset

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh folder under the system's temporary directory, removed when the test is done with it.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("anomalyd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Daemon {
    /// Writes `config` (TOML; `{port}` and `{dir}` are substituted) and starts `anomalyd run`.
    pub fn start(dir: &Path, config: &str) -> Daemon {
        Self::spawn(dir, config, Stdio::null())
    }

    /// As [`Daemon::start`], with a pipe to the daemon's stdin (for `source.kind = "stdin"`).
    pub fn start_piped(dir: &Path, config: &str) -> Daemon {
        Self::spawn(dir, config, Stdio::piped())
    }

    /// Writes lines to the daemon's stdin.
    pub fn send(&mut self, lines: &[&str]) {
        let stdin = self.child.stdin.as_mut().expect("started with start_piped");
        for l in lines {
            writeln!(stdin, "{l}").unwrap();
        }
        stdin.flush().unwrap();
    }

    /// Rewrites the config file (same substitutions as at start), e.g. before a reload.
    pub fn write_config(&self, config: &str) {
        std::fs::write(self.dir.join("anomalyd.toml"), substitute(config, self.port, &self.dir)).unwrap();
    }

    /// As [`Daemon::start_piped`], with at most `open_files` file descriptors (`ulimit -n`).
    pub fn start_piped_with_open_files(dir: &Path, config: &str, open_files: u64) -> Daemon {
        let mut sh = Command::new("sh");
        sh.args(["-c", &format!("ulimit -n {open_files} && exec \"$0\" \"$@\""), env!("CARGO_BIN_EXE_anomalyd")]);
        Self::spawn_with(sh, dir, config, Stdio::piped())
    }

    fn spawn(dir: &Path, config: &str, stdin: Stdio) -> Daemon {
        Self::spawn_with(Command::new(env!("CARGO_BIN_EXE_anomalyd")), dir, config, stdin)
    }

    /// Runs `command` (the binary, or something that execs it) with `run --config`.
    fn spawn_with(mut command: Command, dir: &Path, config: &str, stdin: Stdio) -> Daemon {
        let port = free_port();
        let path = dir.join("anomalyd.toml");
        std::fs::write(&path, substitute(config, port, dir)).unwrap();
        let child = command
            .args(["run", "--config", path.to_str().unwrap()])
            .current_dir(repo())
            .env("ANOMALYD_LOG", "info")
            .stdin(stdin)
            .stdout(Stdio::from(std::fs::File::create(dir.join("stdout")).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(dir.join("stderr")).unwrap()))
            .spawn()
            .unwrap();
        let d = Daemon { child, port, dir: dir.to_path_buf() };
        d.wait_for(|d| d.get("/ready").map(|(code, _)| code == 200).unwrap_or(false), "ready");
        d
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// (status code, body) of a GET on the admin port.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((code, body))
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").expect("scrape /metrics").1
    }

    /// Value of one sample line, e.g. `metric(text, "anomalyd_windows_scored_total")`.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        metric(&self.metrics(), sample)
    }

    pub fn wait_for(&self, ok: impl Fn(&Daemon) -> bool, what: &str) {
        let started = Instant::now();
        while !ok(self) {
            assert!(started.elapsed() < Duration::from_secs(30), "timed out waiting for {what}; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then the exit code (within 20 s).
    pub fn stop(mut self) -> i32 {
        self.signal("TERM");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn substitute(config: &str, port: u16, dir: &Path) -> String {
    config.replace("{port}", &port.to_string()).replace("{dir}", &dir.display().to_string())
}

pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// The (host, bucket start) pairs the flow generator attacked (contracts/flows-vae/labels.csv).
pub fn attacked_host_minutes() -> std::collections::HashSet<(String, i64)> {
    let labels = std::fs::read_to_string(repo().join("contracts/flows-vae/labels.csv")).unwrap();
    labels
        .lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (c[2] == "1").then(|| (c[0].to_string(), c[1].parse().unwrap()))
        })
        .collect()
}

/// A firing flow alert starts in an attacked host-minute and blames the scan's features.
pub fn assert_flow_alert(event: &serde_json::Value, attacked: &std::collections::HashSet<(String, i64)>) {
    let at = (event["series"].as_str().unwrap().to_string(), event["started_ts"].as_f64().unwrap() as i64);
    assert!(attacked.contains(&at), "alert outside the attack: {event}");
    let top: Vec<&str> = event["top_features"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert!(top.contains(&"distinct_dst_ports") || top.contains(&"syn_only_share"), "{top:?}");
}

/// A daemon reading CSV from stdin with bundle `model` (`threshold` 0 = the bundle's), batches
/// scored at once, alerts to `{dir}/alerts.jsonl`.
pub fn stdin_config(model: &str, threshold: f64) -> String {
    format!(
        r#"
[model]
path = "{model}"
threshold = {threshold}
[source]
kind = "stdin"
format = "csv"
csv_delimiter = ";"
[scoring]
batch_max_wait_ms = 1
[admin]
listen = "127.0.0.1:{{port}}"
[output]
sink = "file"
path = "{{dir}}/alerts.jsonl"
"#
    )
}
