#!/usr/bin/env python3
"""Golden values for the learner, from PyTorch: AdamW steps with gradient clipping, the GRPO-family
losses and their gradients (spec section 5, written out independently here), TRL's group
advantages.

Writes learner/tests/fixtures/{adamw,grpo,advantages}.json. Needs: pip install torch
"""
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "learner", "tests", "fixtures")


def adamw():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(4))
    init = {"w": w.detach().clone().tolist(), "b": b.detach().clone().tolist()}
    # transformers' Trainer groups: decay on matrices, none on biases / norms
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                            lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    steps = []
    for k, scale in enumerate([0.1, 5.0, 0.3, 2.0]):  # steps 2 and 4 are clipped
        gw, gb = scale * torch.randn(3, 4), scale * torch.randn(4)
        w.grad, b.grad = gw.clone(), gb.clone()
        norm = torch.nn.utils.clip_grad_norm_([w, b], 1.0).item()
        opt.step()
        steps.append({"grad_w": gw.tolist(), "grad_b": gb.tolist(), "grad_norm": norm,
                      "w": w.detach().tolist(), "b": b.detach().tolist()})
    return {"init": init, "lr": 0.01, "weight_decay": 0.1, "max_grad_norm": 1.0, "steps": steps}


def kl(logp, ref, kind):
    x = ref - logp  # log(pi_ref / pi_theta)
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x * x
    x = x.clamp(-20, 20)  # verl low_var_kl
    return (torch.exp(x) - x - 1).clamp(-10, 10)


def grpo_loss(logp, old, adv, mask, ref, ent, cfg, totals):
    """The spec's formulas (section 5.2-5.4), written out in PyTorch."""
    log_ratio = (logp - old).clamp(-20, 20)
    if cfg["ratio"] == "sequence":  # GSPO
        seq = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = seq.expand_as(mask)
    r = torch.exp(log_ratio)
    pg = torch.max(-adv * r, -adv * r.clamp(1 - cfg["clip_low"], 1 + cfg["clip_high"]))
    if cfg["dual_clip"] is not None:
        pg = torch.where(adv < 0, torch.min(pg, -adv * cfg["dual_clip"]), pg)
    loss_t = pg
    if cfg["kl_coef"]:
        loss_t = loss_t + cfg["kl_coef"] * kl(logp, ref, cfg["kl"])
    if cfg["entropy_coef"]:
        loss_t = loss_t - cfg["entropy_coef"] * ent
    m = loss_t * mask
    agg = cfg["aggregation"]
    if agg == "grpo":
        return ((m.sum(-1) / mask.sum(-1).clamp(min=1)).sum()) / totals["sequences"]
    if agg == "bnpo":
        return m.sum() / mask.sum() / totals["micro_batches"]
    if agg == "dapo":
        return m.sum() / totals["tokens"]
    return m.sum() / (totals["sequences"] * totals["max_completion_length"])  # dr_grpo


def grpo():
    torch.manual_seed(1)
    lengths = [6, 3, 5, 1]
    b, t = len(lengths), 6
    mask = torch.tensor([[1.0 if j < n else 0.0 for j in range(t)] for n in lengths])
    logp = -torch.rand(b, t) * 3
    old = logp + 0.3 * torch.randn(b, t)
    ref = logp + 0.2 * torch.randn(b, t)
    ent = torch.rand(b, t) * 2
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5])[:, None].expand(b, t).contiguous()
    totals = {"sequences": 8, "tokens": 27.0, "micro_batches": 2, "max_completion_length": 6}
    cases = []
    for agg in ["grpo", "bnpo", "dapo", "dr_grpo"]:
        for ratio in ["token", "sequence"]:
            for dual in [None, 3.0]:
                for kl_coef, kind, ent_coef in [(0.0, "k3", 0.0), (0.04, "k3", 0.01), (0.1, "k1", 0.0), (0.1, "k2", 0.0)]:
                    cfg = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": dual, "ratio": ratio, "aggregation": agg,
                           "kl": kind, "kl_coef": kl_coef, "entropy_coef": ent_coef}
                    x = logp.clone().requires_grad_(True)
                    loss = grpo_loss(x, old, adv, mask, ref, ent, cfg, totals)
                    loss.backward()
                    cases.append({"config": cfg, "loss": loss.item(), "grad": x.grad.tolist()})
    return {"logp": logp.tolist(), "old": old.tolist(), "ref": ref.tolist(), "entropy": ent.tolist(),
            "advantages": adv.tolist(), "mask": mask.tolist(), "totals": totals, "cases": cases}


def advantages():
    """TRL's group advantages (nanmean / nanstd with Bessel's correction, eps 1e-4)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, float("nan"), 0.0, 1.0, 3.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3])
    out = {"rewards": [None if r != r else r for r in rewards.tolist()], "groups": groups.tolist()}
    for scale in ["group", "batch", "none"]:
        adv = torch.zeros_like(rewards)
        finite = rewards[~torch.isnan(rewards)]
        batch_std = finite.std()
        for g in groups.unique():
            sel = groups == g
            r = rewards[sel]
            mean = torch.nanmean(r)
            valid = r[~torch.isnan(r)]
            std = valid.std() if len(valid) > 1 else torch.tensor(float("nan"))
            if scale == "group":
                a = (r - mean) / (std + 1e-4)
            elif scale == "batch":
                a = (r - mean) / (batch_std + 1e-4)
            else:
                a = r - mean
            adv[sel] = torch.nan_to_num(a, nan=0.0)
        out[scale] = adv.tolist()
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, fn in [("adamw", adamw), ("grpo", grpo), ("advantages", advantages)]:
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            json.dump(fn(), f)
    print("learner fixtures written")


if __name__ == "__main__":
    main()
