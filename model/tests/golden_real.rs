//! Real tokenizers and a real model against transformers (fixtures from
//! scripts/make_model_fixtures.py; assets from scripts/fetch-assets.sh):
//! Qwen2.5 / Qwen3 and SmolLM2 token ids and chat templates, and SmolLM2-135M-Instruct
//! imported from its quantized GGUF.

mod common;

use candle_core::{DType, Device};
use common::*;
use model::generate::{generate, GenerationConfig};
use model::sampling::SamplingParams;
use model::tokenizer::Tokenizer;
use model::{forward, gguf, Batch};
use serde_json::Value;

fn tokenizer_golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tokenizer_golden.json")).unwrap())
        .unwrap()
}

fn check_tokenizer(name: &str, tok: &Tokenizer, golden: &Value) {
    let cases = &golden[name];
    for case in cases["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let with_special: Vec<u32> = serde_json::from_value(case["ids_special"].clone()).unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids,
            "{name}: ids of {text:?}"
        );
        assert_eq!(
            tok.encode(text, true).unwrap(),
            with_special,
            "{name}: ids (special) of {text:?}"
        );
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{name}: decode of {text:?}"
        );
    }
    check_chats(name, tok, cases, golden);
}

/// The chat cases of `cases` rendered and tokenized as transformers did.
fn check_chats(name: &str, tok: &Tokenizer, cases: &Value, golden: &Value) {
    let chats = &golden["chats"];
    for case in cases["chat"].as_array().unwrap() {
        let conv = case["name"].as_str().unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let text = tok.render_chat(&chats[conv], gen).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "{name}: chat {conv} (generation prompt {gen})"
        );
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            ids,
            "{name}: chat ids {conv}"
        );
    }
}

#[test]
fn qwen_tokenizer_and_chat_templates_match_transformers() {
    let golden = tokenizer_golden();
    let mut tok = Tokenizer::from_dir(&asset("qwen3-tokenizer")).unwrap();
    check_tokenizer("qwen3", &tok, &golden);
    let template = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../scripts/data/qwen2.5-instruct.chat_template.jinja"),
    )
    .unwrap();
    tok.set_chat_template(Some(template));
    check_tokenizer("qwen2.5", &tok, &golden);
}

#[test]
fn chat_template_kwargs_reach_the_template_as_in_transformers() {
    // Qwen3's template with enable_thinking = false: the generation prompt closes an empty
    // <think> block, and an assistant turn's is not dropped
    let golden = tokenizer_golden();
    let cases = &golden["qwen3_kwargs"];
    let mut tok = Tokenizer::from_dir(&asset("qwen3-tokenizer")).unwrap();
    let plain = tok.render_chat(&golden["chats"]["user"], true).unwrap();
    tok.set_template_kwargs(cases["kwargs"].as_object().unwrap().clone());
    check_chats("qwen3_kwargs", &tok, cases, &golden);
    let without = tok.render_chat(&golden["chats"]["user"], true).unwrap();
    assert!(
        without.ends_with("<think>\n\n</think>\n\n") && !plain.contains("<think>"),
        "{plain:?} / {without:?}"
    );
}

fn smollm2() -> gguf::GgufModel {
    gguf::load(
        &asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn smollm2_gguf_tokenizer_and_template_match_transformers() {
    let m = smollm2();
    check_tokenizer("smollm2", &m.tokenizer, &tokenizer_golden());
}

#[test]
fn smollm2_gguf_logits_and_greedy_match_transformers() {
    let m = smollm2();
    let c = &m.weights.config;
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.num_key_value_heads),
        (30, 576, 3)
    );
    assert!(c.tie_word_embeddings);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_golden.json")).unwrap())
            .unwrap();
    let golden =
        candle_core::safetensors::load(fixture("smollm2_golden.safetensors"), &Device::Cpu)
            .unwrap();
    let ids: Vec<u32> = serde_json::from_value(json["prompt_ids"].clone()).unwrap();
    let batch = Batch::new(
        std::slice::from_ref(&ids),
        &[vec![1; ids.len()]],
        &Device::Cpu,
    )
    .unwrap();
    let logits = forward(&m.weights, &batch, None)
        .unwrap()
        .squeeze(0)
        .unwrap(); // [T, V]
    let last = logits.get(ids.len() - 1).unwrap();
    let first = logits.get(0).unwrap();
    let scale = max_abs(&golden["last_logits"]);
    for (ours, key) in [(&first, "first_logits"), (&last, "last_logits")] {
        let d = max_abs_diff(ours, &golden[key]);
        eprintln!("{key}: max |diff| {d:e}, logit scale {scale}");
        // measured 6e-5 (logits up to 34 in magnitude, 30 layers in f32)
        assert!(d < 5e-4, "{key}: max diff {d:e} (logit scale {scale})");
    }
    let expected: Vec<u32> = serde_json::from_value(json["greedy"].clone()).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: expected.len(),
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let out = generate(&m.weights.detach(), &[ids], &cfg, Some(&m.tokenizer)).unwrap();
    assert_eq!(out[0].tokens, expected);
    assert_eq!(out[0].text.as_deref(), json["greedy_text"].as_str());
}

/// The stop-string check decodes a tail of the completion: at every prefix up to the first
/// whose whole text holds a stop string, it says what decoding the whole prefix says. Over
/// text with multi-byte characters and over random token ids (byte tokens, special tokens,
/// partial characters), with both tokenizers.
#[test]
fn the_stop_string_check_on_a_tail_agrees_with_the_whole_text() {
    let qwen = Tokenizer::from_dir(&asset("qwen3-tokenizer")).unwrap();
    let smol = smollm2().tokenizer;
    let text = "Déjà vu: 12 + 30 = 42, naïve café — 日本語のテキスト.\n\nThe answer is 42. \
                Ünïcödé again, and = signs = more; ends with \\boxed{42} and a long tail \
                of words to make the completion longer than any window.";
    let stops: &[&[&str]] = &[
        &["= "],
        &["\n\n"],
        &["é — 日"],
        &["\\boxed{42}", "zzz"],
        &["window."],
        &["e"],
    ];
    let mut rng = model::rng::Rng::new(5);
    for tok in [&qwen, &smol] {
        let mut sequences = vec![tok.encode(text, false).unwrap()];
        for _ in 0..3 {
            let v = tok.vocab_size() as u64;
            sequences.push((0..120).map(|_| rng.below(v) as u32).collect());
        }
        for tokens in &sequences {
            for stop in stops {
                let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
                for n in 1..=tokens.len() {
                    let whole = tok.decode(&tokens[..n], true).unwrap();
                    let want = stop.iter().any(|s| whole.contains(s.as_str()));
                    let got =
                        model::generate::completes_a_stop_string(&tokens[..n], &stop, tok).unwrap();
                    assert_eq!(got, want, "{stop:?} after {n} tokens: {whole:?}");
                    if want {
                        break;
                    }
                }
            }
        }
    }
}

#[test]
fn stop_strings_cut_the_text_and_end_generation() {
    let m = smollm2();
    let prompt = m
        .tokenizer
        .apply_chat_template(
            &[model::tokenizer::Message::new("user", "What is 12 + 30?")],
            true,
        )
        .unwrap();
    let ids = m.tokenizer.encode(&prompt, false).unwrap();
    // transformers' greedy continuation is "12 + 30 = 32\n\nThis is a classic"
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        sampling: SamplingParams::greedy(),
        stop_strings: vec!["= ".into()],
        ..Default::default()
    };
    let out = generate(&m.weights.detach(), &[ids], &cfg, Some(&m.tokenizer)).unwrap();
    assert_eq!(out[0].finish, model::generate::FinishReason::Stop);
    assert_eq!(out[0].text.as_deref(), Some("12 + 30 "));
    assert!(out[0].tokens.len() < 16);
}
