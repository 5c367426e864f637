//! Converts a model to a Hugging Face checkpoint directory:
//!
//!     cargo run --release -p ferrite-model --example export_checkpoint -- IN OUT [DTYPE] [MAX_SHARD_BYTES]
//!
//! IN is an HF directory or a `.gguf` file; DTYPE is f32 (default), bf16 or f16. The result
//! loads in transformers with `AutoModelForCausalLM.from_pretrained(OUT)` (and, for a GGUF,
//! `AutoTokenizer.from_pretrained(OUT)`); scripts/make_model_fixtures.py --check-ferrite checks it.

use std::path::PathBuf;

use candle_core::{DType, Device};
use model::tokenizer::Tokenizer;
use model::{gguf, Weights};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output, rest @ ..] = args.as_slice() else {
        return Err("usage: export_checkpoint IN OUT [f32|bf16|f16] [MAX_SHARD_BYTES]".into());
    };
    let dtype = match rest.first().map(String::as_str).unwrap_or("f32") {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => return Err(format!("unknown dtype {other:?} (f32, bf16, f16)").into()),
    };
    let max_shard: usize = match rest.get(1) {
        Some(n) => n.parse()?,
        None => 2 << 30,
    };
    let (input, output) = (PathBuf::from(input), PathBuf::from(output));
    let (weights, tokenizer) = if input.extension().is_some_and(|e| e == "gguf") {
        let m = gguf::load(&input, DType::F32, &Device::Cpu)?;
        (m.weights, Some(m.tokenizer))
    } else {
        let w = Weights::load_dir(&input, DType::F32, &Device::Cpu)?;
        let tok = input
            .join("tokenizer.json")
            .exists()
            .then(|| Tokenizer::from_dir(&input))
            .transpose()?;
        (w, tok)
    };
    weights.save_dir(&output, dtype, max_shard)?;
    if let Some(tok) = tokenizer {
        tok.save_dir(&output)?;
    }
    println!(
        "wrote {} ({} parameters, {:?})",
        output.display(),
        weights.config.num_parameters(),
        dtype
    );
    Ok(())
}
