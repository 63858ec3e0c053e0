//! The admin port against hostile clients, with the real binary: idle half-sent requests cannot
//! hold the daemon at its file-descriptor limit, and an oversized request head is refused.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{repo, stdin_config, temp_dir, Daemon};

/// The daemon's file-descriptor limit in these tests, and more slow clients than it: before the
/// admin limits, this many held the daemon at its limit and `/live` timed out until they let go.
/// (Not many more: past the limit the rest wait in the listen backlog, and once that is full a
/// connect itself times out.)
const OPEN_FILES: u64 = 512;
const SLOW_CLIENTS: usize = 600;
/// `[admin] max_connections` in the reference config.
const MAX_CONNECTIONS: usize = 256;
/// `[admin] header_read_timeout_ms` in the reference config.
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(5000);

fn config() -> String {
    stdin_config(repo().join("models/skab-convae").to_str().unwrap(), 0.0)
}

/// A request whose head never ends: the line and one header, then nothing.
fn half_sent_request(port: u16) -> TcpStream {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&address, Duration::from_secs(5)).unwrap();
    s.write_all(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
    s
}

/// The status of `GET path` with extra header lines `head`, if the reply came within `within`.
fn status(port: u16, path: &str, head: &str, within: Duration) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}Connection: close\r\n\r\n").ok()?;
    let reply = String::from_utf8(closed_within(&mut s, within)?).ok()?;
    reply.split(' ').nth(1)?.parse().ok()
}

/// What the server sent on `s` until it closed it (end of stream, or a reset: a server that
/// refuses a request closes with some of it unread), if it closed it within `deadline`.
fn closed_within(s: &mut TcpStream, deadline: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(deadline)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(got),
            Err(_) => return None,
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn live_answers_while_many_half_sent_requests_are_held_and_they_are_closed_after_the_header_timeout() {
    let dir = temp_dir("admin-slow-clients");
    let d = Daemon::start_piped_with_open_files(&dir, &config(), OPEN_FILES);
    let mut slow: Vec<(Instant, TcpStream)> = (0..SLOW_CLIENTS).map(|_| (Instant::now(), half_sent_request(d.port))).collect();

    // While every one of them holds its half request: /live answers, each time within a second,
    // and the daemon stays below its descriptor limit.
    for attempt in 0..5 {
        let asked = Instant::now();
        let code = status(d.port, "/live", "", Duration::from_secs(1));
        assert_eq!(code, Some(200), "/live attempt {attempt} with {SLOW_CLIENTS} slow clients held; stderr:\n{}", d.stderr());
        assert!(asked.elapsed() < Duration::from_secs(1), "/live took {:?}", asked.elapsed());
    }
    let fds = open_fds(d.child.id());
    assert!(fds > 0 && (fds as u64) < OPEN_FILES - 64, "{fds} descriptors open (limit {OPEN_FILES})");

    // The newest slow client is still held (older ones made room for newer connections), and
    // is closed once the header read timeout has passed since it connected, not before.
    let (opened, mut newest) = slow.pop().unwrap();
    let reply = closed_within(&mut newest, HEADER_READ_TIMEOUT + Duration::from_secs(5))
        .unwrap_or_else(|| panic!("a half-sent request still open {:?} after it connected", opened.elapsed()));
    let held = opened.elapsed();
    assert!(held >= HEADER_READ_TIMEOUT - Duration::from_millis(200), "closed after {held:?}, before the header timeout");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 408"), "{reply}");
    drop(slow);

    let metrics = d.metrics();
    let closed = |reason: &str| common::metric(&metrics, &format!("anomalyd_admin_connections_closed_total{{reason=\"{reason}\"}}"));
    assert!(closed("header_timeout").is_some_and(|n| n >= 1.0), "{metrics}");
    assert!(closed("evicted").is_some_and(|n| n >= (SLOW_CLIENTS - MAX_CONNECTIONS) as f64), "{metrics}");
    assert_eq!(d.stop(), 0);
}

#[test]
fn an_oversized_request_head_is_refused_with_431() {
    let dir = temp_dir("admin-big-head");
    let d = Daemon::start_piped(&dir, &config());
    let big = format!("X-Padding: {}\r\n", "a".repeat(16 * 1024));
    assert_eq!(status(d.port, "/live", &big, Duration::from_secs(5)), Some(431));
    assert_eq!(status(d.port, "/live", "X-Small: 1\r\n", Duration::from_secs(5)), Some(200));
    let metrics = d.metrics();
    assert_eq!(common::metric(&metrics, "anomalyd_admin_connections_closed_total{reason=\"head_too_large\"}"), Some(1.0), "{metrics}");
    assert_eq!(d.stop(), 0);
}
