//! `serve` as a client sees it: the OpenAI chat-completions API on a loopback port with the
//! tiny model, against the `chat` command's answers.
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use base64::Engine;

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(model: &Path, extra: &[&str]) -> Server {
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
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
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

const KEY: &str = "test-key";

fn post(addr: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, text) = http(addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json"), ("Authorization", &format!("Bearer {KEY}"))], body.to_string().as_bytes());
    (status, serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({"raw": text})))
}

/// The streamed text of a `stream: true` request, its finish reason and usage.
fn post_stream(addr: &str, body: &serde_json::Value) -> (String, String, serde_json::Value) {
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

fn data_url(path: &Path) -> String {
    let mime = if path.extension().is_some_and(|e| e == "png") { "image/png" } else { "image/jpeg" };
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap()))
}

fn with_image(question: &str, url: &str) -> serde_json::Value {
    serde_json::json!({"role": "user", "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]})
}

fn chat_answer(model: &str, image: &Path, question: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llava-jp"))
        .args(["chat", "--model", model, "--image", image.to_str().unwrap(), "--prompt", question, "--temperature", "0", "--max-new-tokens", "6", "--repetition-penalty", "1.5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The answer as streamed, less the line end `chat` adds (the random model's answer may
    // start or end with spaces, so nothing is trimmed).
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout.strip_suffix('\n').unwrap_or(&stdout).to_string()
}

#[test]
fn serve_answers_as_chat_does_streamed_or_not_concurrently_and_refuses_bad_requests() {
    let dir = common::tiny_model_dir("serve", true);
    let model = dir.display().to_string();
    let server = start(&dir, &["--api-key", KEY, "--model-name", "tiny", "--max-tokens", "32", "--max-body-mib", "1", "--max-image-megapixels", "0.3"]);
    let addr = server.addr.as_str();

    let (status, health) = http(addr, "GET", "/health", &[], b"");
    assert!(status == 200 && health.contains("ok"), "{status} {health}");
    let (status, page) = http(addr, "GET", "/", &[], b"");
    assert!(status == 200 && page.contains("<html lang=\"ja\">") && page.contains("送信"), "{status}");
    let (status, models) = http(addr, "GET", "/v1/models", &[("Authorization", &format!("Bearer {KEY}"))], b"");
    assert!(status == 200 && models.contains("\"tiny\""), "{status} {models}");

    // Greedy answers equal the chat command's, streamed and not.
    let horse = common::fixture("images/horse.png");
    let question = "この馬は何色ですか？";
    let expected = chat_answer(&model, &horse, question);
    assert!(!expected.trim().is_empty(), "the answer has text, so equal answers mean something: {expected:?}");
    let request = serde_json::json!({"model": "tiny", "messages": [with_image(question, &data_url(&horse))], "temperature": 0, "max_tokens": 6, "repetition_penalty": 1.5});
    let (status, reply) = post(addr, &request);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["choices"][0]["message"]["content"].as_str().unwrap(), expected, "{reply}");
    let usage = &reply["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 20 && usage["completion_tokens"].as_u64().unwrap() <= 6, "{usage}");
    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    streamed["stream_options"] = serde_json::json!({"include_usage": true});
    let (text, finish, stream_usage) = post_stream(addr, &streamed);
    assert_eq!(text, expected);
    assert_eq!(finish, reply["choices"][0]["finish_reason"].as_str().unwrap());
    assert_eq!(&stream_usage, usage);

    // Several at once: each gets its own answer, as when asked alone.
    let rocket = common::fixture("images/rocket.jpg");
    let cases = [(horse.clone(), "この馬は何色ですか？"), (rocket.clone(), "何が見えますか？"), (horse.clone(), "背景には何がありますか？")];
    let alone: Vec<String> = cases
        .iter()
        .map(|(img, q)| {
            let (status, r) = post(addr, &serde_json::json!({"messages": [with_image(q, &data_url(img))], "temperature": 0, "max_tokens": 12, "repetition_penalty": 1.5}));
            assert_eq!(status, 200, "{r}");
            r["choices"][0]["message"]["content"].as_str().unwrap().to_string()
        })
        .collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (img, q))| {
                s.spawn(move || {
                    let body = serde_json::json!({"messages": [with_image(q, &data_url(img))], "temperature": 0, "max_tokens": 12, "repetition_penalty": 1.5, "stream": i % 2 == 0});
                    if i % 2 == 0 {
                        post_stream(addr, &body).0
                    } else {
                        post(addr, &body).1["choices"][0]["message"]["content"].as_str().unwrap().to_string()
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(alone.iter().all(|a| !a.trim().is_empty()) && alone[0] != alone[1], "{alone:?}");
    assert_eq!(together, alone);

    // Every bad request gets its 4xx, naming what is wrong.
    let png = |w: u32, h: u32| {
        let mut bytes = Vec::new();
        image::RgbImage::new(w, h).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
    };
    let ask = |content: serde_json::Value| serde_json::json!({"messages": [{"role": "user", "content": content}], "max_tokens": 4});
    let bad: Vec<(serde_json::Value, u16, &str)> = vec![
        (serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "何？"}]}), 404, "gpt-4o"),
        (serde_json::json!({"messages": []}), 400, "question"),
        (serde_json::json!({"prompt": "何？"}), 400, "messages"),
        (serde_json::json!({"messages": [{"role": "assistant", "content": "はい"}]}), 400, "role"),
        (ask(serde_json::json!([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, {"type": "text", "text": "何？"}])), 400, "data URL"),
        (ask(serde_json::json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}, {"type": "text", "text": "何？"}])), 400, "image"),
        (ask(serde_json::json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}, {"type": "text", "text": "何？"}])), 400, "base64"),
        (ask(serde_json::json!([{"type": "image_url", "image_url": {"url": png(600, 600)}}, {"type": "text", "text": "何？"}])), 400, "600x600"),
        (ask(serde_json::json!([{"type": "image_url", "image_url": {"url": png(8, 8)}}, {"type": "image_url", "image_url": {"url": png(8, 8)}}])), 400, "second image"),
        (serde_json::json!({"messages": [{"role": "user", "content": "何？"}], "max_tokens": 100000}), 400, "max_tokens"),
        (serde_json::json!({"messages": [{"role": "user", "content": "何？"}], "temperature": -1}), 400, "temperature"),
        (ask(serde_json::json!("長い質問です。".repeat(100))), 400, "token"),
    ];
    for (body, status, says) in bad {
        let (got, reply) = post(addr, &body);
        let message = reply["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(got == status && message.contains(says), "{body}: {got} {reply}");
    }
    let (status, text) = http(addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json"), ("Authorization", &format!("Bearer {KEY}"))], b"{not json");
    assert!(status == 400 && text.contains("request body"), "{status} {text}");
    let (status, text) = http(addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json")], request.to_string().as_bytes());
    assert!(status == 401 && text.contains("API key"), "{status} {text}");
    let big = vec![b' '; 2 << 20];
    let (status, _) = http(addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json"), ("Authorization", &format!("Bearer {KEY}"))], &big);
    assert_eq!(status, 413);

    // And it still serves.
    let (status, reply) = post(addr, &request);
    assert_eq!(status, 200);
    assert_eq!(reply["choices"][0]["message"]["content"].as_str().unwrap(), expected);
    drop(server);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_cancelled_generation_stops_after_the_current_step() {
    use llava_jp::infer::{Assistant, Conversation, FinishReason, GenerationConfig, LoadOptions};
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = common::tiny_model_dir("serve-cancel", true);
    let device = Default::default();
    let assistant = Assistant::<burn::backend::Flex>::load(&dir, &LoadOptions::default(), &device).unwrap();
    let prompt = assistant.prompt(&Conversation::default(), "こんにちは。").unwrap();
    let cancel = std::sync::Arc::new(AtomicBool::new(false));
    let config = GenerationConfig { max_new_tokens: 20, eos_token_id: None, cancel: Some(cancel.clone()), ..GenerationConfig::default() };
    let mut seen = 0;
    let (answers, _) = assistant
        .answer(&[prompt], &config, &mut |_, _| {
            seen += 1;
            cancel.store(true, Ordering::Relaxed);
        })
        .unwrap();
    assert_eq!(seen, 1);
    assert_eq!(answers[0].0.finish, FinishReason::Cancelled);
    assert_eq!(answers[0].0.tokens.len(), 1);
    std::fs::remove_dir_all(dir).ok();
}
