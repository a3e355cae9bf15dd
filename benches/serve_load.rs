//! Load on the server: requests per second and p50/p99 latency of non-streamed greedy
//! chat completions (one picture, one question) on a loopback port, at several concurrencies.
//! Every answer is checked against the one-at-a-time answer. Bounded in count and time.
//!
//!     cargo bench --bench serve_load [-- --model DIR --requests 200 --concurrency 1,4,16
//!         --max-tokens 16 --seconds 60 --backend flex]
//!
//! Without `--model`, the tests' tiny random model. Prints one JSON line per concurrency.
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::http::{data_url, load, post, start, with_image, KEY};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
    };
    let requests: usize = arg("--requests", "200").parse().expect("--requests: a count");
    let max_tokens: usize = arg("--max-tokens", "16").parse().expect("--max-tokens: a count");
    let seconds: u64 = arg("--seconds", "60").parse().expect("--seconds: whole seconds");
    let concurrency: Vec<usize> = arg("--concurrency", "1,4,16").split(',').map(|c| c.trim().parse().expect("--concurrency: counts, comma-separated")).collect();
    let given = args.iter().position(|a| a == "--model").map(|i| std::path::PathBuf::from(&args[i + 1]));
    let model = given.clone().unwrap_or_else(|| common::tiny_model_dir("serve-load-bench", true));
    let server = start(&model, &["--api-key", KEY, "--backend", &arg("--backend", "flex"), "--max-queue", "1024"]);
    let image = common::fixture("images/horse.png");
    let body = serde_json::json!({"messages": [with_image("この馬は何色ですか？", &data_url(&image))], "temperature": 0, "max_tokens": max_tokens, "repetition_penalty": 1.5});
    let (status, reply) = post(&server.addr, &body);
    assert_eq!(status, 200, "{reply}");
    let expected = reply["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    eprintln!("model {}, answer {expected:?}, {} completion tokens", model.display(), reply["usage"]["completion_tokens"]);
    for c in concurrency {
        println!("{}", load(&server.addr, &body, &expected, requests, c, Duration::from_secs(seconds)));
    }
    drop(server);
    if given.is_none() {
        std::fs::remove_dir_all(model).ok();
    }
}
