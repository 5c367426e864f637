#!/usr/bin/env python3
"""Golden values for the shaped rewards of rewards/src/format.rs that come from Open-R1
(open-r1/src/open_r1/rewards.py): the cosine-scaled reward (`get_cosine_scaled_reward`) and the
n-gram repetition penalty (`get_repetition_penalty_reward`, language "en"), their formulas written
out here as Open-R1 computes them: lengths in Python characters (code points), words from
`str.lower().split()`.

Writes rewards/tests/data/shaped.json. Needs only the standard library.
"""
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "rewards", "tests", "data", "shaped.json")


def cosine_scaled(text, is_correct, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct, max_len):
    gen_len = len(text)
    progress = gen_len / max_len
    cosine = math.cos(progress * math.pi)
    if is_correct:
        min_value, max_value = min_value_correct, max_value_correct
    else:  # Open-R1 swaps min / max for incorrect answers
        min_value, max_value = max_value_wrong, min_value_wrong
    return min_value + 0.5 * (max_value - min_value) * (1.0 + cosine)


def repetition(text, ngram_size, max_penalty):
    if text == "":
        return 0.0
    words = text.lower().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = list(zip(*[words[i:] for i in range(ngram_size)]))
    return (1 - len(set(ngrams)) / len(ngrams)) * max_penalty


TEXTS = [
    "",
    "42",
    "The answer is 42.",
    "so so so so so so so so",
    "we add 3 and 4 then we add 3 and 4 then we add 3 and 4 to get 7",
    "Wait, WAIT, wait. Let me check: wait wait wait.",
    "tabs\tand\nnew lines\tand\nnew lines\tand\nnew lines",
    "ÉTÉ été Été été — ünïcödé words, ÉTÉ été Été été",
    "x" * 700,
    "a b c " * 300,
]


def main():
    cosine_params = [
        (-1.0, -0.5, 0.5, 1.0, 1000),  # Open-R1's defaults
        (-0.5, -0.1, 0.8, 1.0, 64),
        (0.0, -0.5, 0.5, 1.0, 20),
    ]
    cosine = []
    for text in TEXTS:
        for params in cosine_params:
            for correct in (True, False):
                cosine.append({"text": text, "correct": correct, "params": list(params),
                               "reward": cosine_scaled(text, correct, *params)})
    rep = []
    for text in TEXTS:
        for n, penalty in [(3, -1.0), (1, -0.5), (2, -1.0), (5, -0.2)]:
            rep.append({"text": text, "ngram_size": n, "max_penalty": penalty,
                        "reward": repetition(text, n, penalty)})
    with open(OUT, "w") as f:
        json.dump({"cosine": cosine, "repetition": rep}, f, ensure_ascii=False, indent=0)
    print(f"{len(cosine)} cosine and {len(rep)} repetition cases written to {OUT}")


if __name__ == "__main__":
    main()
