//! Shaped rewards on the form and length of a completion.

/// 1.0 when the completion is `<think>…</think>` then `<answer>…</answer>`, each tag exactly once
/// and in order (the structure Logic-RL and TinyZero prompts ask for); 0.0 otherwise.
/// `think_in_prompt`: the prompt already ends with `<think>`, so the completion must not open one.
pub fn tag_format(completion: &str, think_in_prompt: bool) -> f32 {
    let text = if think_in_prompt {
        format!("<think>{completion}")
    } else {
        completion.to_string()
    };
    if crate::knights::tags_in_order(&text) {
        1.0
    } else {
        0.0
    }
}

/// DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with `L_max = max_tokens` and
/// `L_cache = cache_tokens`: 0 up to `L_max − L_cache`, then linear down to −1 at `L_max`, and
/// −1 beyond.
pub fn overlong_penalty(tokens: usize, max_tokens: usize, cache_tokens: usize) -> f32 {
    let free = max_tokens.saturating_sub(cache_tokens);
    if tokens <= free {
        0.0
    } else if tokens <= max_tokens {
        (free as f32 - tokens as f32) / cache_tokens.max(1) as f32
    } else {
        -1.0
    }
}

/// Kimi k1.5's length reward over one group of responses to a prompt:
/// `λ = 0.5 − (len − min_len) / (max_len − min_len)`; a correct response gets `λ`, an incorrect
/// one `min(0, λ)`. All zeros when every response has the same length.
pub fn group_length_reward(lengths: &[usize], correct: &[bool]) -> Vec<f32> {
    let (Some(&min), Some(&max)) = (lengths.iter().min(), lengths.iter().max()) else {
        return Vec::new();
    };
    lengths
        .iter()
        .zip(correct)
        .map(|(&len, &ok)| {
            if max == min {
                return 0.0;
            }
            let lambda = 0.5 - (len - min) as f32 / (max - min) as f32;
            if ok {
                lambda
            } else {
                lambda.min(0.0)
            }
        })
        .collect()
}

/// Open-R1's cosine-scaled reward (`get_cosine_scaled_reward`; Yeo et al. 2025, "Demystifying
/// Long Chain-of-Thought Reasoning in LLMs"): the answer's correctness scaled by the completion's
/// length in characters along half a cosine, `lo + ½(hi − lo)(1 + cos(π·chars / max_chars))`:
/// a correct answer from `max_correct` (empty) down to `min_correct` (at `max_chars`), a wrong
/// one from `max_wrong`'s opposite end: `min_wrong` when empty, rising to `max_wrong`, so a
/// short wrong answer costs more than a long one. Past `max_chars` the cosine turns back up, as
/// Open-R1's does.
pub fn cosine_scaled(chars: usize, correct: bool, r: &CosineRewards) -> f32 {
    let cosine = (chars as f64 / r.max_chars.max(1) as f64 * std::f64::consts::PI).cos();
    // a wrong answer swaps the ends: its largest value is at max_chars
    let (lo, hi) = match correct {
        true => (r.min_correct, r.max_correct),
        false => (r.max_wrong, r.min_wrong),
    };
    (lo + 0.5 * (hi - lo) * (1.0 + cosine)) as f32
}

/// The four ends of [`cosine_scaled`] and its length scale (Open-R1's defaults: −1, −0.5, 0.5, 1
/// and 1000 characters).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineRewards {
    pub min_wrong: f64,
    pub max_wrong: f64,
    pub min_correct: f64,
    pub max_correct: f64,
    pub max_chars: usize,
}

impl Default for CosineRewards {
    fn default() -> Self {
        CosineRewards {
            min_wrong: -1.0,
            max_wrong: -0.5,
            min_correct: 0.5,
            max_correct: 1.0,
            max_chars: 1000,
        }
    }
}

/// Open-R1's n-gram repetition penalty (`get_repetition_penalty_reward`; Yeo et al. 2025,
/// appendix C.2): over the lower-cased whitespace-separated words, `max_penalty · (1 − distinct
/// n-grams / n-grams)`, 0 for a text of fewer than `ngram_size` words. `max_penalty ≤ 0`.
pub fn repetition_penalty(text: &str, ngram_size: usize, max_penalty: f64) -> f32 {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    if ngram_size == 0 || words.len() < ngram_size {
        return 0.0;
    }
    let ngrams: Vec<&[&str]> = words.windows(ngram_size).collect();
    let distinct: std::collections::HashSet<&[&str]> = ngrams.iter().copied().collect();
    ((1.0 - distinct.len() as f64 / ngrams.len() as f64) * max_penalty) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dapo_overlong_penalty() {
        // DAPO: L_max = 20480, L_cache = 4096
        assert_eq!(overlong_penalty(16384, 20480, 4096), 0.0);
        assert_eq!(overlong_penalty(18432, 20480, 4096), -0.5);
        assert_eq!(overlong_penalty(20480, 20480, 4096), -1.0);
        assert_eq!(overlong_penalty(30000, 20480, 4096), -1.0);
    }

    #[test]
    fn kimi_length_reward() {
        let r = group_length_reward(&[100, 200, 300], &[true, true, false]);
        assert_eq!(r, vec![0.5, 0.0, -0.5]);
        let r = group_length_reward(&[100, 300], &[false, true]);
        assert_eq!(r, vec![0.0, -0.5]);
        assert_eq!(group_length_reward(&[5, 5], &[true, false]), vec![0.0, 0.0]);
    }

    #[test]
    fn tag_structure() {
        assert_eq!(tag_format("<think>a</think><answer>b</answer>", false), 1.0);
        assert_eq!(tag_format("a</think><answer>b</answer>", true), 1.0);
        assert_eq!(tag_format("<think>a</think><answer>b</answer>", true), 0.0);
        assert_eq!(tag_format("<answer>b</answer>", false), 0.0);
    }
}
