//! Training a tokenizer in llm-jp v2.1's form on a corpus of one's own: a Unigram model (the
//! `tokenizers` crate's trainer) with byte fallback, llm-jp's special tokens at ids 0–7
//! (`<EOD|LLM-jp>` = 7 is eos), its normaliser (`▁` for spaces and at the start), its decoder,
//! and a post-processor that appends `<EOD|LLM-jp>` to every text, so that everything the spec
//! says of the real tokenizer (chunks around `<image>` each ending in 7, the dropped trailing 7
//! of a generation prompt) holds for it too.

use std::path::{Path, PathBuf};

use tokenizers::models::unigram::{Unigram, UnigramTrainer};
use tokenizers::Trainer;

/// llm-jp's special tokens, by id.
pub const SPECIAL_TOKENS: [&str; 8] =
    ["<unk|LLM-jp>", "<s|LLM-jp>", "</s|LLM-jp>", "<mask|LLM-jp>", "<pad|LLM-jp>", "<CLS|LLM-jp>", "<SEP|LLM-jp>", "<EOD|LLM-jp>"];
pub const EOD: &str = "<EOD|LLM-jp>";
const BYTE_TOKENS: usize = 256;

/// The text as llm-jp's normaliser gives it to the model: `▁` first and for every space.
fn normalise(text: &str) -> String {
    format!("\u{2581}{}", text.replace(' ', "\u{2581}"))
}

/// A normalised text cut after each `。`, `、`, `？` and `:`, and at each `▁` (left out).
fn clauses(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        let end = i + c.len_utf8();
        if c == '\u{2581}' {
            out.push(&text[start..i]);
            start = end;
        } else if matches!(c, '。' | '、' | '？' | ':') {
            out.push(&text[start..end]);
            start = end;
        }
    }
    out.push(&text[start..]);
    out.retain(|c| !c.is_empty());
    out
}

/// A `tokenizer.json` (as JSON) trained on `texts`, with at most `vocab_size` tokens in all
/// (8 special, 256 byte-fallback, the rest learnt pieces).
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<serde_json::Value, String> {
    let reserved = SPECIAL_TOKENS.len() + BYTE_TOKENS;
    if vocab_size <= reserved + 16 {
        return Err(format!("vocab_size {vocab_size} leaves no room for learnt pieces beside {reserved} special and byte tokens"));
    }
    let mut normalised: Vec<String> = texts.iter().filter(|t| !t.is_empty()).map(|t| normalise(t)).collect();
    if normalised.is_empty() {
        return Err("the corpus is empty".into());
    }
    // The trainer seeds its pieces with substrings shared by distinct texts, so a phrase that
    // only ever occurs inside the same long text (a template's system message) would stay
    // spelt out character by character; its clauses, fed as texts of their own, become pieces.
    let clauses: Vec<String> = normalised.iter().flat_map(|t| clauses(t)).map(str::to_owned).collect();
    normalised.extend(clauses);
    let mut trainer = UnigramTrainer::builder()
        .show_progress(false)
        .vocab_size((vocab_size - reserved) as u32)
        .max_piece_length(16)
        .build()
        .map_err(|e| e.to_string())?;
    trainer.feed(normalised.iter(), |s| Ok(vec![s.to_owned()])).map_err(|e| e.to_string())?;
    let mut model = Unigram::default();
    trainer.train(&mut model).map_err(|e| e.to_string())?;

    let mut vocab: Vec<serde_json::Value> = SPECIAL_TOKENS.iter().map(|t| serde_json::json!([t, 0.0])).collect();
    // A space (`▁`) is always a token of its own. A generation prompt ends with the space after
    // "システム:", so the answer's first piece must not have been learnt with that space glued
    // on ("▁赤です。"), or the model never saw the prompt's lone "▁" before an answer; and the
    // reference's label masking (each "... システム: " tokenized alone) lines up only if the
    // space never merges with what precedes it either.
    let learnt: Vec<(String, f64)> = model
        .iter()
        .filter(|(p, _)| !SPECIAL_TOKENS.contains(&p.as_str()) && (p == "\u{2581}" || !p.contains('\u{2581}')))
        .map(|(p, s)| (p.clone(), *s))
        .collect();
    let lowest = learnt.iter().map(|(_, s)| *s).fold(0.0f64, f64::min);
    vocab.extend(learnt.iter().map(|(p, s)| serde_json::json!([p, s])));
    // Byte pieces are only reached by fallback; scored below every learnt piece.
    vocab.extend((0..BYTE_TOKENS).map(|b| serde_json::json!([format!("<0x{b:02X}>"), lowest - 10.0])));
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, t)| serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let eod_id = SPECIAL_TOKENS.iter().position(|t| *t == EOD).expect("listed");
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"Regex": "(?<!\\n)^"}, "content": "\u{2581}"},
            {"type": "Replace", "pattern": {"Regex": " "}, "content": "\u{2581}"}
        ]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": EOD, "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": EOD, "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": EOD, "type_id": 1}}],
            "special_tokens": {EOD: {"id": EOD, "ids": [eod_id], "tokens": [EOD]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"},
            {"type": "Replace", "pattern": {"Regex": "\u{2581}"}, "content": " "},
            {"type": "Fuse"},
            {"type": "Replace", "pattern": {"Regex": "(?<!\\n)^ "}, "content": ""}
        ]},
        "model": {"type": "Unigram", "unk_id": 0, "vocab": vocab, "byte_fallback": true},
    }))
}

/// Trains on `texts` and writes `tokenizer.json`, `tokenizer_config.json` and
/// `special_tokens_map.json` (llm-jp's names for bos, eos, pad, ...) into `dir`. Returns the
/// `tokenizer.json` path and the number of tokens.
pub fn write_tokenizer(dir: &Path, texts: &[String], vocab_size: usize) -> anyhow::Result<(PathBuf, usize)> {
    use anyhow::Context;
    let json = train_tokenizer(texts, vocab_size).map_err(anyhow::Error::msg)?;
    let size = json["model"]["vocab"].as_array().map_or(0, |v| v.len());
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let file = dir.join("tokenizer.json");
    std::fs::write(&file, serde_json::to_string(&json)?)?;
    let names = serde_json::json!({
        "unk_token": SPECIAL_TOKENS[0], "bos_token": SPECIAL_TOKENS[1], "eos_token": EOD, "pad_token": SPECIAL_TOKENS[4],
        "cls_token": SPECIAL_TOKENS[5], "sep_token": SPECIAL_TOKENS[6], "mask_token": SPECIAL_TOKENS[3],
        "additional_special_tokens": [SPECIAL_TOKENS[2]],
    });
    std::fs::write(dir.join("special_tokens_map.json"), serde_json::to_string_pretty(&names)?)?;
    let mut config = names.clone();
    config["tokenizer_class"] = "PreTrainedTokenizerFast".into();
    config["clean_up_tokenization_spaces"] = false.into();
    config["model_max_length"] = 1_000_000_000u64.into();
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok((file, size))
}
