#!/usr/bin/env python3
"""Golden values for ferrite's samplers (model/src/sampling.rs and `sample_rows` in
model/kernels/ferrite.cu), computed by Hugging Face transformers' own logits warpers.

For each row of logits and each (temperature, top_k, top_p), applies TemperatureLogitsWarper,
TopKLogitsWarper and TopPLogitsWarper in the order that `generate` chains them, in float64, and
records which tokens survive and their log-probs under the warped distribution (what a sampled
token's log-prob is). The rows avoid ties at top-p's boundary, where transformers' result depends
on the sort's order; one row ties top-k's k-th value, where transformers keeps every tie.

Writes model/tests/fixtures/sampling_golden.json.

Needs: pip install torch transformers numpy   (CPU is enough)
"""
import json
import os

import numpy as np
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "model", "tests", "fixtures", "sampling_golden.json")

CASES = [  # (temperature, top_k (0 off), top_p (1 off))
    (1.0, 5, 1.0),
    (0.7, 12, 1.0),
    (1.0, 0, 0.9),
    (0.6, 0, 0.3),
    (1.3, 25, 0.6),
    (0.9, 8, 0.95),
    (1.0, 0, 1e-4),
]


def warpers(t, k, p):
    chain = [TemperatureLogitsWarper(t)]
    if k > 0:
        chain.append(TopKLogitsWarper(k))
    if p < 1.0:
        chain.append(TopPLogitsWarper(p))
    return LogitsProcessorList(chain)


def main():
    rng = np.random.default_rng(7)
    rows = [
        (rng.standard_normal(64) * 3).astype(np.float32),
        (rng.standard_normal(2000) * 2).astype(np.float32),
        (rng.standard_normal(100) * 4).astype(np.float32),
    ]
    # row 2: its 5th, 6th and 7th largest logits tied (top_k = 5 keeps all three)
    order = np.argsort(-rows[2])
    rows[2][order[5]] = rows[2][order[4]]
    rows[2][order[6]] = rows[2][order[4]]
    out = []
    for i, z in enumerate(rows):
        for t, k, p in CASES:
            scores = torch.tensor(z, dtype=torch.float64)[None]
            warped = warpers(t, k, p)(None, scores)[0]
            kept = torch.nonzero(torch.isfinite(warped)).flatten()
            logprobs = torch.log_softmax(warped, dim=-1)[kept]
            out.append(
                dict(
                    row=i,
                    temperature=t,
                    top_k=k,
                    top_p=p,
                    kept=kept.tolist(),
                    logprobs=logprobs.tolist(),
                )
            )
    with open(OUT, "w") as f:
        json.dump(dict(rows=[r.tolist() for r in rows], cases=out), f)
        f.write("\n")
    print(f"wrote {OUT}: {len(out)} cases")


if __name__ == "__main__":
    main()
