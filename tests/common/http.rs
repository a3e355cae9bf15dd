//! The server as a client sees it: the `serve` binary on a loopback port, raw HTTP/1.1 requests
//! (one connection each), and a load run that checks every answer.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;

pub struct Server {
    child: Child,
    pub addr: String,
}


impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(model: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llava-jp"))
        .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
    Server { child, addr }
}

/// One HTTP/1.1 request on its own connection; the status and the (de-chunked) body.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A refused body may be answered before it is all sent; the answer is what counts.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header");
    let header = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = header.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut rest = &raw[split + 4..];
    let body = if header.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        out
    } else {
        rest.to_vec()
    };
    (status, String::from_utf8(body).unwrap())
}

pub const KEY: &str = "test-key";

pub fn post(addr: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, text) = http(addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json"), ("Authorization", &format!("Bearer {KEY}"))], body.to_string().as_bytes());
    (status, serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({"raw": text})))
}

/// The streamed text of a `stream: true` request, its finish reason and usage.
pub fn post_stream(addr: &str, body: &serde_json::Value) -> (String, String, serde_json::Value) {
    let (status, text) = http(addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json"), ("Authorization", &format!("Bearer {KEY}"))], body.to_string().as_bytes());
    assert_eq!(status, 200, "{text}");
    let events: Vec<&str> = text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let mut answer = String::new();
    let (mut finish, mut usage) = (String::new(), serde_json::Value::Null);
    for e in &events[..events.len() - 1] {
        let chunk: serde_json::Value = serde_json::from_str(e).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk", "{e}");
        answer.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        if let Some(f) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = f.to_string();
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    (answer, finish, usage)
}

pub fn data_url(path: &Path) -> String {
    let mime = if path.extension().is_some_and(|e| e == "png") { "image/png" } else { "image/jpeg" };
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap()))
}

pub fn with_image(question: &str, url: &str) -> serde_json::Value {
    serde_json::json!({"role": "user", "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]})
}

/// Requests per second and latencies of a load run.
pub struct LoadReport {
    pub concurrency: usize,
    pub seconds: f64,
    /// Sorted, in milliseconds.
    pub latencies_ms: Vec<f64>,
}

impl LoadReport {
    pub fn requests_per_second(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.seconds
    }

    /// The `p`-th percentile (0..=100), nearest rank.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        let n = self.latencies_ms.len();
        assert!(n > 0, "no request finished");
        let rank = ((p / 100.0 * n as f64).ceil() as usize).clamp(1, n);
        self.latencies_ms[rank - 1]
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{{\"concurrency\": {}, \"requests\": {}, \"seconds\": {:.3}, \"requests_per_second\": {:.1}, \"p50_ms\": {:.2}, \"p99_ms\": {:.2}, \"max_ms\": {:.2}}}",
            self.concurrency,
            self.latencies_ms.len(),
            self.seconds,
            self.requests_per_second(),
            self.percentile_ms(50.0),
            self.percentile_ms(99.0),
            self.latencies_ms.last().unwrap()
        )
    }
}

/// `total` non-streamed requests of `body` from `concurrency` clients at once, stopping early
/// once `limit` has passed; every answer must be 200 with the content `expected` (a greedy
/// request has one right answer, so a mixed-up or dropped answer shows).
pub fn load(addr: &str, body: &serde_json::Value, expected: &str, total: usize, concurrency: usize, limit: Duration) -> LoadReport {
    let started = AtomicUsize::new(0);
    let clock = Instant::now();
    let mut latencies_ms: Vec<f64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    while started.fetch_add(1, Ordering::Relaxed) < total && clock.elapsed() < limit {
                        let t = Instant::now();
                        let (status, reply) = post(addr, body);
                        mine.push(t.elapsed().as_secs_f64() * 1e3);
                        assert_eq!(status, 200, "{reply}");
                        assert_eq!(reply["choices"][0]["message"]["content"].as_str(), Some(expected), "{reply}");
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a load client failed")).collect()
    });
    let seconds = clock.elapsed().as_secs_f64();
    latencies_ms.sort_by(f64::total_cmp);
    LoadReport { concurrency, seconds, latencies_ms }
}
