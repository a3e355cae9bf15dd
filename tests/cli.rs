//! The subcommands, run as a user runs them.
mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn llava_jp(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llava-jp"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn inspect_names_the_model_its_parts_and_loads_it() {
    let (ok, out) = llava_jp(&["inspect", "tests/fixtures/llava"]);
    assert!(ok, "{out}");
    assert!(out.contains("LLaVA-JP"), "{out}");
    assert!(out.contains("vision tower") && out.contains("projector") && out.contains("language model"), "{out}");
    assert!(out.contains("F32"), "{out}");
    assert!(out.contains("loads cleanly: yes"), "{out}");

    let (ok, out) = llava_jp(&["inspect", "tests/fixtures/clip/pytorch_model.bin"]);
    assert!(ok && out.contains("CLIP") && out.contains("text tower (ignored)") && out.contains("loads cleanly: yes"), "{out}");

    let (ok, out) = llava_jp(&["inspect", "tests/fixtures/llava/mm_projector.bin"]);
    assert!(ok && out.contains("projector") && out.contains("Mlp(2), 32 -> 32"), "{out}");

    let (ok, out) = llava_jp(&["inspect", "tests/fixtures/gpt2-untied"]);
    assert!(ok && out.contains("GPT-2") && out.contains("loads cleanly: yes"), "{out}");
}

#[test]
fn inspect_reports_what_is_wrong() {
    let (ok, out) = llava_jp(&["inspect", "tests/fixtures/does-not-exist"]);
    assert!(!ok && out.contains("does-not-exist"), "{out}");

    // A GPT-2 config beside a checkpoint of another size: the load fails and says where.
    let dir = std::env::temp_dir().join(format!("llava-jp-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2");
    std::fs::copy(root.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("config.json")).unwrap()).unwrap();
    config["n_embd"] = 48.into();
    config["n_head"] = 4.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let (ok, out) = llava_jp(&["inspect", dir.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("loads cleanly: no") && out.contains("shape mismatch") && out.contains("transformer.wte.weight"), "{out}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn check_runs_the_embedded_fixtures_within_tolerance() {
    let (ok, out) = llava_jp(&["check", "--fixture", "tests/fixtures", "--tolerance", "1e-4"]);
    assert!(ok, "{out}");
    assert!(out.contains("llava[parts]") && out.contains("clip[pytorch_model.bin]"), "{out}");
    let (ok, out) = llava_jp(&["check", "--fixture", "tests/fixtures/gpt2", "--backend", "wgpu", "--dtype", "bf16"]);
    assert!(!ok && out.contains("bf16 is not supported on the wgpu backend"), "{out}");
}

#[test]
fn convert_then_data_check_reports_what_is_used_and_left_out() {
    let dir = std::env::temp_dir().join(format!("llava-jp-cli-data-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("VG_100K")).unwrap();
    image::RgbImage::from_fn(20, 12, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 90])).save(dir.join("VG_100K/1.png")).unwrap();
    std::fs::rename(dir.join("VG_100K/1.png"), dir.join("VG_100K/1.jpg")).unwrap();
    let qas = r#"[{"id": 1, "qas": [{"qa_id": 5, "image_id": 1, "question": "何色？", "answer": "青。"},
                              {"qa_id": 6, "image_id": 1, "question": "形は？", "answer": "四角。"}]},
                  {"id": 2, "qas": [{"qa_id": 7, "image_id": 2, "question": "何？", "answer": "犬。"}]}]"#;
    std::fs::write(dir.join("qa.json"), qas).unwrap();
    let d = |p: &str| dir.join(p).display().to_string();
    let (ok, out) = llava_jp(&["convert", "ja-vg-vqa", "--input", &d("qa.json"), "--output", &d("vg.jsonl")]);
    assert!(ok && out.contains("wrote 3 records"), "{out}");

    let tokenizer = common::tokenizer_path().display().to_string();
    let args = ["data-check", "--data", &d("vg.jsonl"), "--image-folder", &d("."), "--tokenizer", &tokenizer, "--image-size", "32", "--image-tokens", "4"];
    let (ok, out) = llava_jp(&args);
    assert!(ok, "{out}");
    assert!(out.contains("2 samples used, 1 left out") && out.contains("missing-image: 1") && out.contains("sample 2-7"), "{out}");
    let (ok, out) = llava_jp(&[&args[..], &["--bad-samples", "fail"]].concat());
    assert!(!ok && out.contains("sample 2-7") && out.contains("image file not found"), "{out}");
}

/// `llava-jp ARGS` with `input` on standard input.
fn llava_jp_stdin(args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llava-jp"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn export_then_chat_one_question_a_conversation_and_a_questions_file() {
    let dir = common::tiny_model_dir("cli-chat", false);
    let model = dir.display().to_string();
    let horse = common::fixture("images/horse.png").display().to_string();
    // The repetition penalty keeps the random model from answering only spaces, so that equal
    // answers below compare words.
    let greedy = ["--temperature", "0", "--max-new-tokens", "6", "--repetition-penalty", "1.5"];

    // Our checkpoint has no tokenizer: the error says what to do.
    let (ok, out) = llava_jp(&["chat", "--model", &model, "--prompt", "何？"]);
    assert!(!ok && out.contains("no tokenizer.json") && out.contains("--tokenizer"), "{out}");

    let export = dir.with_extension("export").display().to_string();
    let tokenizer = common::tokenizer_path().display().to_string();
    let (ok, out) = llava_jp(&["export", "--model", &model, "--tokenizer", &tokenizer, "--to", &export, "--dtype", "f16"]);
    assert!(ok && out.contains("exported"), "{out}");

    let ask = |extra: &[&str]| llava_jp(&[&["chat", "--model", &export, "--image", &horse, "--prompt", "この馬は何色ですか？"][..], &greedy[..], extra].concat());
    let (ok, single) = ask(&["--stats"]);
    assert!(ok && single.contains("prompt tokens") && single.contains("tokens/s"), "{single}");
    let answer = single.lines().next().unwrap().trim().to_string();
    assert!(!answer.is_empty(), "the answer has text: {single}");

    let (ok, out) = ask(&["--backend", "wgpu", "--dtype", "bf16"]);
    assert!(!ok && out.contains("bf16 is not supported on the wgpu backend"), "{out}");
    let (ok, out) = llava_jp(&["chat", "--model", &export, "--image", "nowhere.jpg", "--prompt", "何？"]);
    assert!(!ok && out.contains("nowhere.jpg"), "{out}");

    // A conversation on standard input: two questions, the history kept, then /quit.
    let (ok, stdout, stderr) = llava_jp_stdin(
        &[&["chat", "--model", &export, "--image", &horse][..], &greedy[..]].concat(),
        "この馬は何色ですか？\n\n/image nowhere.png\n背景は？\n/quit\n",
    );
    assert!(ok, "{stdout}{stderr}");
    let answers: Vec<&str> = stdout.lines().collect();
    assert_eq!(answers.len(), 2, "{stdout}");
    assert_eq!(answers[0].trim(), answer, "the first turn is the single question's answer");
    assert!(stderr.contains("nowhere.png"), "{stderr}");

    // A questions file: good lines answered in batches, bad ones reported in place.
    let folder = dir.with_extension("questions");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(&horse, folder.join("horse.png")).unwrap();
    let lines = [
        r#"{"id": "a", "image": "horse.png", "question": "この馬は何色ですか？"}"#,
        r#"{"id": "b", "image": "missing.jpg", "question": "何？"}"#,
        r#"not json"#,
        r#"{"id": "d", "question": "こんにちは。"}"#,
        r#"{"id": "e", "image": "horse.png", "question": "この馬は何色ですか？"}"#,
    ];
    std::fs::write(folder.join("q.jsonl"), lines.join("\n")).unwrap();
    let answers_file = folder.join("answers.jsonl");
    let (ok, out) = llava_jp(&[&["chat", "--model", &export, "--questions", folder.join("q.jsonl").to_str().unwrap(),
        "--output", answers_file.to_str().unwrap(), "--batch-size", "2"][..], &greedy[..]].concat());
    assert!(ok && out.contains("3 answered, 2 refused"), "{out}");
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(&answers_file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 5);
    assert_eq!(records[0]["id"], "a");
    assert_eq!(records[0]["answer"].as_str().unwrap().trim(), answer, "batched (left-padded) equals the single answer");
    assert_eq!(records[4]["answer"], records[0]["answer"]);
    assert!(records[0]["finish_reason"] == "length" || records[0]["finish_reason"] == "stop");
    assert!(records[1]["error"].as_str().unwrap().contains("missing.jpg"), "{}", records[1]);
    assert!(records[2]["error"].as_str().unwrap().contains("line 3"), "{}", records[2]);
    assert!(records[3]["answer"].is_string() && records[3].get("error").is_none(), "{}", records[3]);
    for d in [&dir, &folder, &dir.with_extension("export")] {
        std::fs::remove_dir_all(d).ok();
    }
}

/// The README's main command, shortened: data, tokenizer, both stages, held-out evaluation and
/// export, then `chat` on the model directory it leaves.
#[test]
fn the_quick_demo_learns_to_see_and_chat_answers_from_its_model() {
    use llava_jp::demo::synth::{QuestionType, COLOURS};
    let out = std::env::temp_dir().join(format!("llava-jp-cli-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let out_arg = out.display().to_string();
    let (ok, text) = llava_jp(&["demo", "--quick", "--out", &out_arg]);
    assert!(ok, "{text}");
    for written in ["run-stage1/loss.png", "run-stage2/loss.png", "stage2.toml", "model/model.safetensors", "model/tokenizer.json"] {
        assert!(out.join(written).is_file(), "{written} missing:\n{text}");
    }
    assert!(text.contains("Held-out exact match per question type"), "{text}");

    // Accuracy per question type from the answers file, against guessing.
    let mut tally: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let answers = std::fs::read_to_string(out.join("eval.jsonl")).unwrap();
    for line in answers.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let t = tally.entry(r["type"].as_str().unwrap().to_string()).or_default();
        t.0 += usize::from(r["correct"].as_bool().unwrap());
        t.1 += 1;
    }
    let accuracy = |t: QuestionType| {
        let (right, all) = tally[t.name()];
        right as f64 / all as f64
    };
    let report: Vec<String> = QuestionType::ALL.iter().map(|&t| format!("{} {:.2}", t.name(), accuracy(t))).collect();
    // Colour is what a short run learns first; together the types are far above guessing.
    assert!(accuracy(QuestionType::Colour) >= QUICK_COLOUR, "{report:?}\n{text}");
    let mean: f64 = QuestionType::ALL.iter().map(|&t| accuracy(t)).sum::<f64>() / 5.0;
    let chance: f64 = QuestionType::ALL.iter().map(|&t| 1.0 / t.choices() as f64).sum::<f64>() / 5.0;
    assert!(mean >= 2.0 * chance, "mean accuracy {mean:.2} vs chance {chance:.2}: {report:?}");

    // `chat` answers from the exported directory with a colour, as trained.
    let first: serde_json::Value = serde_json::from_str(answers.lines().next().unwrap()).unwrap();
    let image = first["image"].as_str().unwrap();
    let model = out.join("model").display().to_string();
    let (ok, said) = llava_jp(&["chat", "--model", &model, "--image", image, "--prompt", "何色ですか？", "--temperature", "0"]);
    assert!(ok, "{said}");
    let said = said.lines().next().unwrap_or("").trim().to_string();
    assert!(COLOURS.iter().any(|c| said == format!("{}です。", c.0)), "chat said {said:?}");
    std::fs::remove_dir_all(&out).ok();
}

/// A quick run (300 steps, about 80 s) answered every held-out colour in its making.
const QUICK_COLOUR: f64 = 0.9;
