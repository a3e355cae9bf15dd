//! The data pipeline against the reference: token ids, labels and prompts equal to what
//! LLaVA-JP's Python makes with the real llm-jp v2.1 tokenizer
//! (`model-import/scripts/make_data_fixtures.py` -> `tests/fixtures/data/preprocess.json`).
use std::path::{Path, PathBuf};

use llava_jp::data::{generation_prompt, preprocess, PreprocessError, Template, TextTokenizer, Turn};

/// The real tokenizer lives beside the checkout (`../shared/reference/`), not in it; point
/// `LLAVA_JP_TOKENIZER` elsewhere to use another copy.
fn tokenizer_path() -> PathBuf {
    let path = std::env::var_os("LLAVA_JP_TOKENIZER").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/llm-jp-tokenizer-v2.1/tokenizer.json")
    });
    assert!(path.exists(), "the llm-jp v2.1 tokenizer is not at {} (set LLAVA_JP_TOKENIZER)", path.display());
    path
}

fn fixture() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/preprocess.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn special_ids_come_from_the_tokenizer_config() {
    let tok = TextTokenizer::from_file(tokenizer_path()).unwrap();
    let f = fixture();
    assert_eq!(tok.bos_id, f["bos_token_id"].as_i64());
    assert_eq!(tok.eos_id, f["eos_token_id"].as_i64());
    assert_eq!(tok.token_to_id("<EOD|LLM-jp>"), Some(7));
    assert_eq!(tok.trailing_special_tokens().unwrap(), 1);
}

#[test]
fn encoding_and_decoding_equal_hf_tokenizers() {
    let tok = TextTokenizer::from_file(tokenizer_path()).unwrap();
    let f = fixture();
    for e in f["encodings"].as_array().unwrap() {
        let text = e["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids(&e["input_ids"]), "{text:?}");
    }
    for d in f["decodings"].as_array().unwrap() {
        assert_eq!(tok.decode(&ids(&d["input_ids"])).unwrap(), d["text"].as_str().unwrap());
    }
}

#[test]
fn ids_and_labels_equal_the_reference_for_both_templates() {
    let tok = TextTokenizer::from_file(tokenizer_path()).unwrap();
    let f = fixture();
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let template = Template::by_name(c["template"].as_str().unwrap()).unwrap();
        let turns: Vec<Turn> = serde_json::from_value(c["turns"].clone()).unwrap();
        let max_length = c["max_length"].as_u64().unwrap() as usize;
        let result = preprocess(&tok, &template, &turns, c["has_image"].as_bool().unwrap(), max_length);
        if c["mismatch"].as_bool().unwrap() {
            match result {
                Err(PreprocessError::Mismatch { masked, actual }) => assert_ne!(masked, actual, "{name}"),
                other => panic!("{name}: expected a tokenization mismatch, got {other:?}"),
            }
            continue;
        }
        let encoded = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(encoded.input_ids, ids(&c["input_ids"]), "{name}: input ids");
        assert_eq!(encoded.labels, ids(&c["labels"]), "{name}: labels");
    }
}

#[test]
fn generation_prompts_equal_the_reference_demo() {
    let tok = TextTokenizer::from_file(tokenizer_path()).unwrap();
    for p in fixture()["prompts"].as_array().unwrap() {
        let history: Vec<(String, String)> = serde_json::from_value(p["history"].clone()).unwrap();
        let question = p["question"].as_str().unwrap();
        let got = generation_prompt(&tok, &Template::v1(), &history, question, p["has_image"].as_bool().unwrap()).unwrap();
        assert_eq!(got, ids(&p["input_ids"]), "{question}");
        assert_ne!(got.last(), Some(&7), "the trailing end-of-text id is dropped");
    }
}

#[test]
fn malformed_conversations_are_refused_with_a_reason() {
    let tok = TextTokenizer::from_file(tokenizer_path()).unwrap();
    let turn = |from: &str, value: &str| Turn { from: from.into(), value: value.into() };
    let v1 = Template::v1();
    assert_eq!(preprocess(&tok, &v1, &[], true, 1024), Err(PreprocessError::Empty));
    assert!(matches!(
        preprocess(&tok, &v1, &[turn("ユーザー", "質問"), turn("システム", "答え")], true, 1024),
        Err(PreprocessError::NoImagePlaceholder)
    ));
    assert!(matches!(
        preprocess(&tok, &v1, &[turn("ユーザー", "<image><image>二枚"), turn("システム", "答え")], true, 1024),
        Err(PreprocessError::SeveralImages(2))
    ));
    assert!(matches!(
        preprocess(&tok, &v1, &[turn("ユーザー", "<image>a"), turn("ユーザー", "b")], true, 1024),
        Err(PreprocessError::OutOfOrder { index: 1, .. })
    ));
    assert!(matches!(
        preprocess(&tok, &v1, &[turn("robot", "<image>a"), turn("システム", "b")], true, 1024),
        Err(PreprocessError::UnknownSpeaker { index: 0, .. })
    ));
    assert!(matches!(
        preprocess(&tok, &Template::plain(), &[turn("ユーザー", "<image>")], true, 1024),
        Err(PreprocessError::PlainNeedsTwoTurns(1))
    ));
    assert!(Template::by_name("llama_3").unwrap_err().contains("llama_3"));
}
