#!/usr/bin/env python3
"""Golden values for the subnetwork analysis (spec section 3), from PyTorch and NumPy written
independently of ferrite: which parameters an update changed in bf16 (bitwise, Zhu et al.) and by
Mukherjee et al.'s test (|bf16(theta1) - bf16(theta0)| > 1e-5, computed in bf16 as
sparsity_in_rl/check_sparsity.py does), the Frobenius norm of each update, the overlap figures
o1, o2 and Jaccard with their closed-form random baselines, checked here against a Monte Carlo
estimate over random masks of the same sizes.

AlphaRL (spec section 2): top singular triplets (numpy.linalg.svd), numerical rank
(torch.linalg.matrix_rank with its default tolerance, in float32 as the authors' update_rank.py),
the norm-matched rank-1 update, backward sign alignment, and the one-component PLS regression with
OLS on its score and the inverse transform at a target (scikit-learn's PLSRegression and
LinearRegression, as AlphaPLS.py).

Writes learner/tests/fixtures/{subnetwork,alpharl}.json.
Needs: pip install torch numpy scikit-learn
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


def alpharl_case():
    from sklearn.cross_decomposition import PLSRegression
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(9)
    mats = []
    for (m, n, rank, noise) in [(6, 4, 4, 0.0), (5, 7, 2, 0.0), (8, 8, 3, 1e-9), (3, 9, 1, 0.0)]:
        a = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
        a = (a + noise * rng.standard_normal((m, n))).astype(np.float32)
        u, sv, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
        u1, v1 = u[:, 0], vt[0]
        if u1[np.argmax(np.abs(u1))] < 0:
            u1, v1 = -u1, -v1
        fro = np.linalg.norm(a.astype(np.float64))
        r = int(torch.linalg.matrix_rank(torch.from_numpy(a)).item())
        lam = 0.7
        rank1 = lam * (fro / sv[0]) * sv[0] * np.outer(u1, v1)
        mats.append({"m": m, "n": n, "data": a.flatten().tolist(), "sigma": sv[0], "u": u1.tolist(),
                     "v": v1.tolist(), "frobenius": fro, "rank": r, "lambda": lam,
                     "rank1": rank1.flatten().tolist()})
    # a trajectory of scaled rank-1 vectors with arbitrary signs, and accuracies rising with it
    k, d = 6, 5
    direction = rng.standard_normal(d)
    traj = np.array([(0.2 + 0.15 * t) * direction + 0.05 * rng.standard_normal(d) for t in range(k)])
    signs = np.array([1, -1, 1, 1, -1, 1])
    raw = traj * signs[:, None]
    aligned = raw.copy()
    flips = [False] * k
    for t in range(k - 2, -1, -1):
        if aligned[t] @ aligned[t + 1] < 0:
            aligned[t] = -aligned[t]
            flips[t] = True
    acc = np.array([0.31, 0.35, 0.40, 0.42, 0.47, 0.50])
    pls = PLSRegression(n_components=1, scale=True).fit(aligned, acc)
    scores = pls.transform(aligned)[:, 0]
    ols = LinearRegression().fit(scores[:, None], acc)
    target = 0.6
    tau = (target - ols.intercept_) / ols.coef_[0]
    inverse = pls.inverse_transform(np.array([[tau]]))[0]
    return {"matrices": mats, "trajectory": raw.tolist(), "aligned": aligned.tolist(), "flips": flips,
            "accuracy": acc.tolist(), "x_weights": pls.x_weights_[:, 0].tolist(),
            "x_loadings": pls.x_loadings_[:, 0].tolist(), "scores": scores.tolist(),
            "slope": float(ols.coef_[0]), "intercept": float(ols.intercept_),
            "r2": float(ols.score(scores[:, None], acc)), "target": target, "inverse": inverse.tolist()}


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "subnetwork.json"), "w") as f:
        json.dump({"update": update_case(), "overlap": overlap_case()}, f)
    with open(os.path.join(OUT, "alpharl.json"), "w") as f:
        json.dump(alpharl_case(), f)
    print("subnetwork and alpharl fixtures written")


if __name__ == "__main__":
    main()
