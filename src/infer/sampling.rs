//! Choosing the next token from a row of logits, as transformers' `generate` does it: the
//! repetition penalty first (a logits processor), then temperature, top-k and top-p (warpers),
//! then a draw from the softmax, or the arg max when not sampling.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy (the arg max); otherwise logits are divided by it and a token is drawn.
    pub temperature: f64,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// CTRL's penalty on every token already in the sequence (prompt and answer): a positive
    /// logit is divided by it, a negative one multiplied. 1 is none.
    pub repetition_penalty: f64,
}

impl Default for SamplingConfig {
    /// Greedy, no penalty.
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0 }
    }
}

impl SamplingConfig {
    /// LLaVA-JP's demo settings (spec, "Generation").
    pub fn reference_demo() -> Self {
        Self { temperature: 0.1, ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be 0 (greedy) or positive, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!("repetition_penalty must be positive, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// Picks tokens for one sequence; its own generator, so a sequence's draws do not depend on
/// which other sequences share its batch.
pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(config: SamplingConfig, seed: u64) -> Self {
        Self { config, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// The next token given the `logits` of the last position and the tokens of the sequence so
    /// far (`seen`: prompt text ids and generated ids; negative ids are image placeholders).
    pub fn next(&mut self, logits: &mut [f32], seen: &[i64]) -> i64 {
        apply_repetition_penalty(logits, seen, self.config.repetition_penalty);
        if self.config.is_greedy() {
            return argmax(logits) as i64;
        }
        let t = self.config.temperature as f32;
        logits.iter_mut().for_each(|l| *l /= t);
        apply_top_k(logits, self.config.top_k);
        apply_top_p(logits, self.config.top_p);
        draw(logits, self.rng.random::<f64>()) as i64
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each distinct id seen once.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[i64], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let p = penalty as f32;
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        if id < 0 || id as usize >= logits.len() || !done.insert(id) {
            continue;
        }
        let l = &mut logits[id as usize];
        *l = if *l < 0.0 { *l * p } else { *l / p };
    }
}

/// The first index of the largest value (torch's `argmax` on ties).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Keeps every logit at least as large as the k-th largest (ties kept, as transformers does).
pub fn apply_top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    logits.iter_mut().filter(|l| **l < kth).for_each(|l| *l = f32::NEG_INFINITY);
}

/// Nucleus filtering as transformers' `TopPLogitsWarper`: in ascending order, tokens whose
/// cumulative probability stays within `1 - top_p` are removed; the most likely always stays.
pub fn apply_top_p(logits: &mut [f32], top_p: f64) {
    if top_p >= 1.0 {
        return;
    }
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(a.cmp(&b)));
    let mut cumulative = 0.0f64;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        cumulative += probs[i];
        if cumulative <= 1.0 - top_p && rank < last {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// Softmax in f64 (masked logits are -inf).
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The token where the cumulative probability first exceeds `u` (in [0, 1)).
fn draw(logits: &[f32], u: f64) -> usize {
    let probs = softmax(logits);
    let mut cumulative = 0.0;
    let mut last_possible = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            last_possible = i;
            cumulative += p;
            if u < cumulative {
                return i;
            }
        }
    }
    last_possible
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalty_divides_positive_and_multiplies_negative_once_per_id() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 0, -200], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_the_nucleus() {
        let mut l = vec![1.0, 3.0, 3.0, 0.0];
        apply_top_k(&mut l, 1);
        assert_eq!(l, vec![f32::NEG_INFINITY, 3.0, 3.0, f32::NEG_INFINITY]);
        // Probabilities ~ 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two.
        let mut l = vec![3.0f32, 2.0, 1.0, 0.0];
        apply_top_p(&mut l, 0.8);
        assert!(l[0].is_finite() && l[1].is_finite() && l[2] == f32::NEG_INFINITY && l[3] == f32::NEG_INFINITY, "{l:?}");
        // A tiny top_p still keeps the most likely token.
        let mut l = vec![3.0f32, 2.0];
        apply_top_p(&mut l, 1e-6);
        assert_eq!(l, vec![3.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn sampling_follows_the_seed_and_the_distribution() {
        let config = SamplingConfig { temperature: 1.0, ..Default::default() };
        let logits = vec![0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let run = |seed| {
            let mut s = Sampler::new(config.clone(), seed);
            (0..2000).map(|_| s.next(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        let ones = run(3).iter().filter(|&&t| t == 1).count() as f64 / 2000.0;
        assert!((ones - 0.75).abs() < 0.04, "drew token 1 with frequency {ones}");
        let mut greedy = Sampler::new(SamplingConfig::default(), 0);
        assert_eq!(greedy.next(&mut vec![0.5, 0.7, 0.7], &[]), 1);
    }
}
