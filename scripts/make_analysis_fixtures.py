#!/usr/bin/env python3
"""Golden values for the subnetwork analysis (spec section 3), from PyTorch and NumPy written
independently of ferrite: which parameters an update changed in bf16 (bitwise, Zhu et al.) and by
Mukherjee et al.'s test (|bf16(theta1) - bf16(theta0)| > 1e-5, computed in bf16 as
sparsity_in_rl/check_sparsity.py does), the Frobenius norm of each update, the overlap figures
o1, o2 and Jaccard with their closed-form random baselines, checked here against a Monte Carlo
estimate over random masks of the same sizes.

Writes learner/tests/fixtures/subnetwork.json. Needs: pip install torch numpy
"""
import json
import os

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "learner", "tests", "fixtures")


def update_case():
    torch.manual_seed(11)
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (4, 6),
        "model.layers.1.mlp.up_proj.weight": (6, 4),
        "model.layers.1.input_layernorm.weight": (6,),
        "model.embed_tokens.weight": (5, 6),
    }
    tensors = {}
    for name, shape in shapes.items():
        base = torch.randn(shape) * (1.0 if "norm" not in name else 0.1) + (1.0 if "norm" in name else 0.0)
        # a mix: untouched, below bf16 resolution, around the 1e-5 tolerance, clearly moved
        scale = torch.tensor([0.0, 1e-7, 5e-6, 2e-5, 1e-3, 0.05])[torch.randint(0, 6, shape)]
        updated = base + scale * torch.randn(shape)
        b16, u16 = base.to(torch.bfloat16), updated.to(torch.bfloat16)
        bitwise = (b16.view(torch.int16) != u16.view(torch.int16))
        delta = u16 - b16  # bf16 arithmetic, as the authors' script
        tol = ~torch.isclose(delta, torch.zeros_like(delta), atol=1e-5, rtol=1e-5)
        frob = torch.linalg.norm((updated.double() - base.double()).flatten()).item()
        tensors[name] = {"base": base.tolist(), "updated": updated.tolist(),
                         "changed_bf16": bitwise.flatten().int().tolist(),
                         "changed_tol": tol.flatten().int().tolist(), "frobenius": frob}
    n = sum(np.prod(s) for s in shapes.values())
    all_bf = sum(sum(t["changed_bf16"]) for t in tensors.values())
    all_tol = sum(sum(t["changed_tol"]) for t in tensors.values())
    return {"tol": 1e-5, "tensors": tensors,
            "all": {"parameters": int(n), "unchanged_bf16": 1 - all_bf / n, "unchanged_tol": 1 - all_tol / n}}


def overlap_case():
    rng = np.random.default_rng(5)
    n = 1000
    a = rng.random(n) < 0.3
    b = (rng.random(n) < 0.5) | (a & (rng.random(n) < 0.4))  # correlated with a
    inter, ua, ub = (a & b).sum(), a.sum(), b.sum()
    p, q = ua / n, ub / n
    # Monte Carlo: random masks with the same counts
    sims = []
    for _ in range(4000):
        ra = np.zeros(n, bool)
        ra[rng.choice(n, ua, replace=False)] = True
        rb = np.zeros(n, bool)
        rb[rng.choice(n, ub, replace=False)] = True
        i = (ra & rb).sum()
        sims.append((i / ua, i / ub, i / (ra | rb).sum()))
    mc = np.mean(sims, axis=0)
    out = {"a": a.astype(int).tolist(), "b": b.astype(int).tolist(),
           "o1": inter / ua, "o2": inter / ub, "jaccard": inter / (a | b).sum(),
           "o1_random": q, "o2_random": p, "jaccard_random": p * q / (p + q - p * q),
           "monte_carlo": {"o1": mc[0], "o2": mc[1], "jaccard": mc[2]}}
    # the closed forms hold for o1 and o2 exactly in expectation; Jaccard's is the
    # independent-Bernoulli approximation: check they agree to within sampling noise
    assert abs(mc[0] - q) < 0.005 and abs(mc[1] - p) < 0.005 and abs(mc[2] - out["jaccard_random"]) < 0.005
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "subnetwork.json"), "w") as f:
        json.dump({"update": update_case(), "overlap": overlap_case()}, f)
    print("subnetwork fixtures written")


if __name__ == "__main__":
    main()
