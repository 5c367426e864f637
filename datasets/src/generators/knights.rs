//! Knights and knaves (the K&K puzzles of Xie et al., in Logic-RL's prompt format): knights
//! always tell the truth, knaves always lie; 2–8 inhabitants, one statement each, and exactly one
//! consistent assignment (checked over all 2ⁿ).

use serde_json::{json, Map};

use super::Generator;
use crate::record::{Message, Prompt, Record};
use crate::rng::Stream;

const NAMES: &[&str] = &[
    "Zoey", "Liam", "Mason", "Ava", "Oliver", "Emma", "Noah", "Sophia", "Lucas", "Mia", "Ethan",
    "Isabella", "Aiden", "Harper", "Jack", "Evelyn", "Owen", "Abigail", "Leo", "Chloe", "Henry",
    "Grace", "Samuel", "Lily",
];

/// Logic-RL's system prompt for the K&K task.
pub const SYSTEM_PROMPT: &str = "The user asks a question, and the Assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user with the final answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>. Now the user asks you to solve a logical reasoning problem. After thinking, when you finally reach a conclusion, clearly state the identity of each character within <answer> </answer> tags. i.e., <answer> (1) Zoey is a knight\n(2) ... </answer>.";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Claim {
    /// person is a knight (true) / knave (false)
    Is(usize, bool),
    Not(usize, bool),
    And((usize, bool), (usize, bool)),
    Or((usize, bool), (usize, bool)),
    Implies((usize, bool), (usize, bool)),
    Iff((usize, bool), (usize, bool)),
}

impl Claim {
    fn holds(self, roles: &[bool]) -> bool {
        let is = |(p, k): (usize, bool)| roles[p] == k;
        match self {
            Claim::Is(p, k) => is((p, k)),
            Claim::Not(p, k) => !is((p, k)),
            Claim::And(a, b) => is(a) && is(b),
            Claim::Or(a, b) => is(a) || is(b),
            Claim::Implies(a, b) => !is(a) || is(b),
            Claim::Iff(a, b) => is(a) == is(b),
        }
    }

    fn text(self, speaker: &str, names: &[&str], rng: &mut Stream) -> String {
        let role = |k: bool| if k { "knight" } else { "knave" };
        let atom = |(p, k): (usize, bool)| format!("{} is a {}", names[p], role(k));
        let quote = match self {
            Claim::Is(p, k) => atom((p, k)),
            Claim::Not(p, k) => format!("{} is not a {}", names[p], role(k)),
            Claim::And(a, b) => format!("{} and {}", atom(a), atom(b)),
            Claim::Or(a, b) => format!("{} or {}", atom(a), atom(b)),
            Claim::Implies(a, b) => format!("If {} then {}", atom(a), atom(b)),
            Claim::Iff(a, b) => format!("{} if and only if {}", atom(a), atom(b)),
        };
        match rng.range(0, 3) {
            0 => format!("{speaker} said, \"{quote}.\""),
            1 => format!("{speaker} told you that {}.", lower_first(&quote)),
            2 => format!("In {speaker}'s words: \"{quote}.\""),
            _ => format!("{speaker} remarked, \"{quote}.\""),
        }
    }
}

fn lower_first(s: &str) -> String {
    if let Some(rest) = s.strip_prefix("If ") {
        format!("if {rest}")
    } else {
        s.to_string()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KnightsKnaves {
    pub min_people: u32,
    pub max_people: u32,
}

impl Default for KnightsKnaves {
    fn default() -> Self {
        KnightsKnaves {
            min_people: 3,
            max_people: 7,
        }
    }
}

impl KnightsKnaves {
    /// Difficulty = the number of people (2–8).
    pub fn with_people(n: u32) -> Self {
        let n = n.clamp(2, 8);
        KnightsKnaves {
            min_people: n,
            max_people: n,
        }
    }
}

/// The ground truth in Logic-RL's `solution_text_format`.
pub fn solution_text(names: &[&str], roles: &[bool]) -> String {
    names
        .iter()
        .zip(roles)
        .enumerate()
        .map(|(i, (n, &k))| {
            format!(
                "({}) {n} is a {}",
                i + 1,
                if k { "knight" } else { "knave" }
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn random_claim(rng: &mut Stream, n: usize) -> Claim {
    let atom = |rng: &mut Stream| (rng.range(0, n as i64 - 1) as usize, rng.chance(0.5));
    match rng.range(0, 5) {
        0 => {
            let (p, k) = atom(rng);
            Claim::Is(p, k)
        }
        1 => {
            let (p, k) = atom(rng);
            Claim::Not(p, k)
        }
        2 => Claim::And(atom(rng), atom(rng)),
        3 => Claim::Or(atom(rng), atom(rng)),
        4 => Claim::Implies(atom(rng), atom(rng)),
        _ => Claim::Iff(atom(rng), atom(rng)),
    }
}

/// How many of the 2ⁿ assignments are consistent with every claim.
fn consistent_assignments(claims: &[Claim], n: usize) -> usize {
    (0..1u32 << n)
        .filter(|mask| {
            let roles: Vec<bool> = (0..n).map(|i| mask >> i & 1 == 1).collect();
            claims
                .iter()
                .enumerate()
                .all(|(i, c)| c.holds(&roles) == roles[i])
        })
        .count()
}

impl Generator for KnightsKnaves {
    fn name(&self) -> &'static str {
        "knights_knaves"
    }

    fn generate(&self, seed: u64, split: u64, index: u64) -> Record {
        let mut attempt = 0u64;
        loop {
            let mut rng = Stream::new(seed, 0x4B4B ^ split, index.wrapping_mul(1 << 20) ^ attempt);
            attempt += 1;
            let n = rng.range(
                self.min_people.max(2) as i64,
                self.max_people.clamp(2, 8) as i64,
            ) as usize;
            let perm = rng.permutation(NAMES.len());
            let names: Vec<&str> = perm[..n].iter().map(|&i| NAMES[i as usize]).collect();
            let roles: Vec<bool> = (0..n).map(|_| rng.chance(0.5)).collect();
            // each speaker's claim is true exactly when the speaker is a knight
            let claims: Vec<Claim> = (0..n)
                .map(|i| loop {
                    let c = random_claim(&mut rng, n);
                    if c.holds(&roles) == roles[i] {
                        break c;
                    }
                })
                .collect();
            if consistent_assignments(&claims, n) != 1 {
                continue;
            }
            let list = match names.as_slice() {
                [a, b] => format!("{a} and {b}"),
                [init @ .., last] => format!("{}, and {last}", init.join(", ")),
                [] => unreachable!("n ≥ 2"),
            };
            let statements: Vec<String> = claims
                .iter()
                .zip(&names)
                .map(|(c, s)| c.text(s, &names, &mut rng))
                .collect();
            let quiz = format!(
                "A very special island is inhabited only by knights and knaves. Knights always tell the truth, and knaves always lie. You meet {n} inhabitants: {list}. {} So who is a knight and who is a knave?",
                statements.join(" ")
            );
            let solution = solution_text(&names, &roles);
            let mut metadata = Map::new();
            metadata.insert("task".into(), json!("knights_knaves"));
            metadata.insert("names".into(), json!(names));
            metadata.insert("solution".into(), json!(roles));
            metadata.insert("people".into(), json!(n));
            // the statements alone, for compact prompt templates (`{statements}`)
            metadata.insert("statements".into(), json!(statements.join(" ")));
            return Record {
                id: index,
                prompt: Prompt::Messages(vec![
                    Message {
                        role: "system".into(),
                        content: SYSTEM_PROMPT.into(),
                    },
                    Message {
                        role: "user".into(),
                        content: quiz,
                    },
                ]),
                answer: Some(solution),
                chosen: None,
                rejected: None,
                metadata,
            };
        }
    }
}
