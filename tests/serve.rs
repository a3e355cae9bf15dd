//! `serve` as a client sees it: the OpenAI chat-completions API on a loopback port with the
//! tiny model, against the `chat` command's answers.
mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::http::{data_url, http, post, post_stream, start, with_image, KEY};

fn chat_answer(model: &str, image: &Path, question: &str, max_new_tokens: usize) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llava-jp"))
        .args(["chat", "--model", model, "--image", image.to_str().unwrap(), "--prompt", question, "--temperature", "0", "--max-new-tokens", &max_new_tokens.to_string(), "--repetition-penalty", "1.5"])
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
    let expected = chat_answer(&model, &horse, question, 6);
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

#[test]
fn many_requests_at_once_each_get_the_right_answer_and_the_load_is_measured() {
    let dir = common::tiny_model_dir("serve-load", true);
    let server = start(&dir, &["--api-key", KEY]);
    let horse = common::fixture("images/horse.png");
    let question = "この馬は何色ですか？";
    let expected = chat_answer(&dir.display().to_string(), &horse, question, 8);
    let body = serde_json::json!({"messages": [with_image(question, &data_url(&horse))], "temperature": 0, "max_tokens": 8, "repetition_penalty": 1.5});
    // Bounded in count and time; `cargo bench --bench serve_load` runs the longer version.
    for concurrency in [1, 4] {
        let report = common::http::load(&server.addr, &body, &expected, 40, concurrency, Duration::from_secs(60));
        println!("{report}");
        assert!(report.latencies_ms.len() >= 10, "only {} requests answered in 60 s", report.latencies_ms.len());
    }
    drop(server);
    std::fs::remove_dir_all(dir).ok();
}

/// Headless Chromium driven over the DevTools protocol, one page.
struct Browser {
    child: Child,
    page: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next_id: u64,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("LLAVA_JP_CHROMIUM") {
        return path.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser", "google-chrome"].map(|name| dir.join(name)))
        .find(|p| p.is_file())
        .expect("the browser test needs headless Chromium: `apt-get install chromium fonts-noto-cjk` (scripts/test.sh installs them), or LLAVA_JP_CHROMIUM=/path/to/chrome")
}

impl Browser {
    fn launch() -> Browser {
        let profile = std::env::temp_dir().join(format!("llava-jp-chromium-{}", std::process::id()));
        let mut child = Command::new(chromium())
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0", "--window-size=1000,720", "--lang=ja"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("Chromium starts");
        // Chromium names its DevTools address on stderr; the rest of stderr is drained so it never blocks.
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let browser_url = rx.recv_timeout(Duration::from_secs(60)).expect("Chromium printed its DevTools address within 60 s");
        let host = browser_url.trim_start_matches("ws://").split('/').next().unwrap().to_string();
        let (browser, _) = tungstenite::connect(browser_url.as_str()).expect("the browser's DevTools socket");
        let mut b = Browser { child, page: browser, next_id: 0, profile };
        let target = b.call("Target.createTarget", serde_json::json!({"url": "about:blank"}));
        let (page, _) = tungstenite::connect(format!("ws://{host}/devtools/page/{}", target["targetId"].as_str().unwrap())).expect("the page's DevTools socket");
        b.page = page;
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = b.page.get_mut() {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        b
    }

    /// One DevTools command and its result (events arriving meanwhile are skipped).
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        self.page.send(tungstenite::Message::text(serde_json::json!({"id": id, "method": method, "params": params}).to_string())).unwrap();
        loop {
            let tungstenite::Message::Text(text) = self.page.read().unwrap_or_else(|e| panic!("{method}: {e}")) else { continue };
            let reply: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method}: {}", reply["error"]);
                return reply["result"].clone();
            }
        }
    }

    fn eval(&mut self, js: &str) -> serde_json::Value {
        let r = self.call("Runtime.evaluate", serde_json::json!({"expression": js, "returnByValue": true}));
        assert!(r["exceptionDetails"].is_null(), "{js}: {}", r["exceptionDetails"]);
        r["result"]["value"].clone()
    }

    /// Evaluates `js` until it gives something other than null or false.
    fn wait_for(&mut self, js: &str, what: &str, limit: Duration) -> serde_json::Value {
        let clock = Instant::now();
        loop {
            let v = self.eval(js);
            if !v.is_null() && v != false {
                return v;
            }
            assert!(clock.elapsed() < limit, "waited {limit:?} for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn press_enter(&mut self) {
        for kind in ["keyDown", "keyUp"] {
            self.call("Input.dispatchKeyEvent", serde_json::json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"}));
        }
    }
}

#[test]
fn the_web_page_answers_a_question_about_a_chosen_picture_in_headless_chromium() {
    let dir = common::tiny_model_dir("serve-browser", true);
    let server = start(&dir, &["--api-key", KEY]);
    let horse = common::fixture("images/horse.png");
    let question = "この馬は何色ですか？";
    let expected = chat_answer(&dir.display().to_string(), &horse, question, 8);
    assert!(!expected.trim().is_empty(), "{expected:?}");

    let mut b = Browser::launch();
    b.call("Page.navigate", serde_json::json!({"url": format!("http://{}/", server.addr)}));
    b.wait_for("document.readyState === 'complete' && !!document.getElementById('ask')", "the page", Duration::from_secs(30));
    // The picture goes through the file input, as the file dialog would put it.
    let input = b.call("Runtime.evaluate", serde_json::json!({"expression": "document.getElementById('file')"}))["result"]["objectId"].clone();
    b.call("DOM.setFileInputFiles", serde_json::json!({"files": [horse.canonicalize().unwrap()], "objectId": input}));
    b.wait_for("!!document.getElementById('preview')", "the picture's preview", Duration::from_secs(10));
    // Greedy, 8 tokens and the chat command's repetition penalty, set on the sliders.
    b.eval("for (const [id, v] of [['temperature', 0], ['max_tokens', 8], ['repetition_penalty', 1.5]]) { const s = document.getElementById(id); s.value = v; s.dispatchEvent(new Event('input')); }");
    // Typed in as committed text (what an IME hands the page), then Enter.
    b.eval("document.getElementById('api_key').focus()");
    b.call("Input.insertText", serde_json::json!({"text": KEY}));
    b.eval("document.getElementById('question').focus()");
    b.call("Input.insertText", serde_json::json!({"text": question}));
    b.press_enter();
    let answer = b.wait_for(
        "(() => { const e = document.querySelector('.error'); if (e) return 'ERROR ' + e.textContent; const a = document.querySelector('.assistant.done'); return a ? a.textContent : null; })()",
        "the answer",
        Duration::from_secs(60),
    );

    // The screenshot is kept whatever happens next: <target>/release/test-artefacts/serve-page.png.
    let shot = b.call("Page.captureScreenshot", serde_json::json!({"format": "png"}));
    let artefacts = Path::new(env!("CARGO_BIN_EXE_llava-jp")).parent().unwrap().join("test-artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
    std::fs::write(artefacts.join("serve-page.png"), &png).unwrap();
    println!("screenshot: {}", artefacts.join("serve-page.png").display());
    assert!(png.len() > 10_000, "a screenshot of {} bytes", png.len());

    assert_eq!(answer.as_str(), Some(expected.as_str()), "the page's answer");
    assert_eq!(b.eval("document.querySelector('.user').textContent").as_str(), Some(question), "the question as the page shows it");
    assert_eq!(b.eval("document.getElementById('question').value").as_str(), Some(""), "the question box is cleared after answering");
    drop(b);
    drop(server);
    std::fs::remove_dir_all(dir).ok();
}
