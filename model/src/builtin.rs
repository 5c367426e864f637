//! The built-in tiny setup that runs on a laptop CPU: a character-level tokenizer (printable
//! ASCII plus ChatML's special tokens, with a ChatML chat template) and tiny Qwen2-architecture
//! configs sized to it. Nothing to download.

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

pub const PAD: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
const UNK: &str = "<unk>";

/// ChatML without a default system message (SmolLM2's shape).
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Ids: 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>`, 3 `<unk>`, then `\n` and the
/// printable ASCII characters 0x20..=0x7E (100 tokens in all).
pub fn char_tokenizer() -> Result<Tokenizer> {
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::AddedToken;
    let mut symbols: Vec<String> = [PAD, IM_START, IM_END, UNK]
        .iter()
        .map(|s| s.to_string())
        .collect();
    symbols.push("\n".into());
    symbols.extend((0x20u8..=0x7e).map(|b| (b as char).to_string()));
    let vocab: Vocab = symbols
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .unk_token(UNK.into())
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_decoder(Some(tokenizers::decoders::fuse::Fuse::new()));
    inner
        .add_special_tokens(
            [PAD, IM_START, IM_END].map(|t| AddedToken::from(t, true).normalized(false)),
        )
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let config = serde_json::json!({
        "chat_template": CHAT_TEMPLATE,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": UNK,
    });
    Ok(Tokenizer::from_parts(inner, Some(&config)))
}

/// A tiny Qwen2 (q/k/v bias, tied embeddings) for the char tokenizer's 100-token vocabulary.
/// [`tiny_config`] in the Qwen3 architecture (`builtin:tiny-qwen3`): no q/k/v biases, each
/// query and key head RMS-normed before the rotation.
pub fn tiny_qwen3_config(hidden: usize, layers: usize) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen3,
        qkv_bias: false,
        ..tiny_config(hidden, layers)
    }
}

pub fn tiny_config(hidden: usize, layers: usize) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2,
        vocab_size: 100,
        hidden_size: hidden,
        intermediate_size: hidden * 3,
        num_hidden_layers: layers,
        num_attention_heads: (hidden / 32).max(1),
        num_key_value_heads: (hidden / 64).max(1),
        head_dim: 32,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 1024,
        tie_word_embeddings: true,
        qkv_bias: true,
        bos_token_id: None,
        eos_token_ids: vec![2],
        pad_token_id: Some(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Message;

    #[test]
    fn char_tokenizer_round_trips_and_keeps_specials_whole() {
        let tok = char_tokenizer().unwrap();
        assert_eq!(tok.vocab_size(), 100);
        let text = tok
            .apply_chat_template(&[Message::new("user", "Compute 12 + 30.")], true)
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nCompute 12 + 30.<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = tok.encode(&text, false).unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1);
        assert_eq!(ids.len(), 1 + 5 + 16 + 1 + 1 + 1 + 10);
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        let unknown = tok.encode("a\tb é", false).unwrap();
        assert_eq!(
            tok.decode(&unknown, true).unwrap(),
            "a<unk>b <unk>",
            "unknown characters stay visible"
        );
        let c = tiny_config(128, 4);
        assert_eq!((c.num_attention_heads, c.num_key_value_heads), (4, 2));
    }
}
