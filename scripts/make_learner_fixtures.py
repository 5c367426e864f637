#!/usr/bin/env python3
"""Golden values for the learner, from PyTorch: AdamW steps with gradient clipping, the GRPO-family
losses and their gradients (spec section 5, written out independently here; CISPO as TRL's
`loss_type="cispo"` and SAPO as its `loss_type="sapo"` compute them), TRL's group
advantages; the estimators of issue 5 (RLOO, REINFORCE++ with and without baseline, PPO's token
rewards, GAE and whitening, AR, EM-RL rewards, the adaptive KL controller), the clipped value
loss, the DPO family and Lopti's two passes, each with gradients where it is a loss; TRL's
importance-sampling correction of the sampler's log-probs (`vllm_importance_sampling_mode`: token or
sequence, truncated or masked at a cap) and the policy losses it weights.

Everything is computed on padded [B, T] tensors with masks (the Rust side works on ragged rows),
from the formulas of shared/spec/algorithms.md sections 1 and 5 and verl's / TRL's definitions.

Clip-Cov and KL-Cov as verl computes them (the tokens picked and the loss with them); DPPO-Binary-TV
and -KL as verl computes them.

Writes learner/tests/fixtures/{adamw,grpo,advantages,estimators,value,dpo,lopti,covariance,dppo,kto,gmpo_gpg,top_entropy}.json.
Needs: pip install torch
"""
import json
import math
import os

import torch
import torch.nn.functional as F

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


def is_weights(old, sampling, mask, mode, cap):
    """TRL's importance_sampling_ratio (grpo_trainer.py, `_generate_and_score_completions`): the
    trainer's log-probs at the start of the step against the sampler's, per token or summed over
    the sequence, truncated (clamp max) or masked (0 above the cap). Returns the weights and the
    values TRL's statistics take (masked tokens, or one per sequence) with their raw values."""
    diff = (old - sampling) * mask
    sequence = mode.startswith("sequence")
    if sequence:
        diff = diff.sum(-1, keepdim=True)
    raw = torch.exp(diff)
    if mode.endswith("truncate"):
        w = raw.clamp(max=cap)
    else:
        w = raw.masked_fill(raw > cap, 0.0)
    flat, flat_raw = (w.flatten(), raw.flatten()) if sequence else (w[mask.bool()], raw[mask.bool()])
    return w.expand_as(mask), flat, flat_raw


def dppo_inside(logp, old, adv, cfg):
    """verl's DPPO valid mask (detached, 0/1): the token's probability moved by at most
    dppo_high (A > 0) / dppo_low (A <= 0), as a difference (dppo_tv) or a binary KL (dppo_kl,
    where a token that moved against its advantage is always inside)."""
    prob, old_prob = torch.exp(logp), torch.exp(old)
    if cfg["loss"] == "dppo_tv":
        up_ok = (prob - old_prob) <= cfg["dppo_high"]
        down_ok = (prob - old_prob) >= -cfg["dppo_low"]
    else:
        binary_kl = old_prob * (old - logp) + (1 - old_prob) * torch.log(
            (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        up_ok = (binary_kl <= cfg["dppo_high"]) | (prob <= old_prob)
        down_ok = (binary_kl <= cfg["dppo_low"]) | (prob >= old_prob)
    return torch.where(adv > 0, up_ok, down_ok).detach().float()


def grpo_loss(logp, old, adv, mask, ref, ent, cfg, totals, weights=None, sampler=None, selected=None):
    """The spec's formulas (section 5.2-5.4), written out in PyTorch; `weights` multiply the
    policy term before KL and entropy join it, as TRL applies its importance-sampling ratio;
    `selected` marks the tokens Clip-Cov or KL-Cov picked (`cov_select`)."""
    log_ratio = (logp - old).clamp(-20, 20)
    if cfg["ratio"] == "sequence":  # GSPO
        seq = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = seq.expand_as(mask)
    r = torch.exp(log_ratio)
    if cfg.get("loss") == "cispo":
        # CISPO (MiniMax-M1; TRL's loss_type="cispo"): the importance weight capped above and
        # detached, times the advantage and the log-prob
        pg = -r.clamp(max=cfg["cispo_max"]).detach() * adv * logp
    elif cfg.get("loss") == "sapo":
        # SAPO (TRL's loss_type="sapo", get_sapo_token_loss): a soft gate sigmoid(tau (r - 1)) 4/tau
        # in place of the clip, tau by the advantage's sign (positive: tau_pos, else tau_neg)
        tau = torch.where(adv > 0, torch.tensor(cfg["sapo_tau_pos"]), torch.tensor(cfg["sapo_tau_neg"]))
        pg = -torch.sigmoid(tau * (r - 1)) * (4.0 / tau) * adv
    elif cfg.get("loss") in ("dppo_tv", "dppo_kl"):
        # verl's compute_policy_loss_dppo_tv / _kl: the detached ratio truncated at clip_ratio_c
        # times the log-prob, on the tokens inside the probability's trust region
        pg = -adv * r.clamp(max=cfg["dppo_cap"]).detach() * logp * dppo_inside(logp, old, adv, cfg)
    elif cfg.get("loss") == "kl_cov":
        # verl's compute_policy_loss_kl_cov: the unclipped surrogate, and on the picked tokens
        # ppo_kl_coef * |log_prob - old_log_prob|
        pg = torch.where(selected > 0, -adv * r + cfg["kl_cov_coef"] * (logp - old).abs(), -adv * r)
    else:
        pg = torch.max(-adv * r, -adv * r.clamp(1 - cfg["clip_low"], 1 + cfg["clip_high"]))
        if cfg.get("loss") == "clip_cov":
            # verl's compute_policy_loss_clip_cov: the picked tokens' term times corr = 0
            pg = pg * (1 - selected)
    if cfg["dual_clip"] is not None:
        pg = torch.where(adv < 0, torch.min(pg, -adv * cfg["dual_clip"]), pg)
    if cfg.get("off_policy_mask") is not None:
        # TRL's get_off_policy_mask (DeepSeek-V3.2's off-policy sequence masking): keep a sequence
        # whose advantage is >= 0 or whose mean sampler-minus-policy log-prob is <= the threshold
        seq_kl = ((sampler - logp.detach()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        keep = ((adv >= 0) | (seq_kl <= cfg["off_policy_mask"])).float()
        pg = pg * keep
    if weights is not None:
        pg = pg * weights
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
    if agg == "seq_sum":  # verl's seq-mean-token-sum
        return m.sum() / totals["sequences"]
    return m.sum() / (totals["sequences"] * totals["max_completion_length"])  # dr_grpo


def luspo_trl(logp, old, adv, mask, cfg, totals):
    """TRL's loss_type="luspo" as its `_compute_loss` writes it: the sequence-level importance
    weight (B, 1), the clipped surrogate, `(per_token_loss * mask.sum(1, keepdim=True)).mean()` over
    the micro-batch's rows and divided by the gradient-accumulation steps: here 4 rows of a step of
    8 sequences in 2 micro-batches, so the mean / 2 is the sum / 8."""
    seq = (logp - old) * mask
    coef_1 = torch.exp(seq.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
    coef_2 = coef_1.clamp(1 - cfg["clip_low"], 1 + cfg["clip_high"])
    a = adv[:, :1]
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)  # (B, 1)
    rows, accumulation = mask.shape[0], totals["sequences"] // mask.shape[0]
    return (per_token_loss * mask.sum(1, keepdim=True)).mean() * rows / (rows * accumulation)


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

    def case(cfg, weights=None, sampler=None):
        """The loss of `cfg` on the batch and its gradient in the log-probs."""
        x = logp.clone().requires_grad_(True)
        loss = grpo_loss(x, old, adv, mask, ref, ent, cfg, totals, weights, sampler)
        loss.backward()
        return {"config": cfg, "loss": loss.item(), "grad": x.grad.tolist()}

    cases = []
    for agg in ["grpo", "bnpo", "dapo", "dr_grpo"]:
        for ratio in ["token", "sequence"]:
            for dual in [None, 3.0]:
                for kl_coef, kind, ent_coef in [(0.0, "k3", 0.0), (0.04, "k3", 0.01), (0.1, "k1", 0.0), (0.1, "k2", 0.0)]:
                    cfg = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": dual, "ratio": ratio, "aggregation": agg,
                           "kl": kind, "kl_coef": kl_coef, "entropy_coef": ent_coef}
                    cases.append(case(cfg))
    # CISPO under every aggregation and ratio level, with the weight's cap above (1.1: some
    # weights capped) or past (5.0, ScaleRL's value) the batch's ratios
    for agg in ["grpo", "bnpo", "dapo", "dr_grpo"]:
        for ratio in ["token", "sequence"]:
            for cap in [1.1, 5.0]:
                for kl_coef, kind, ent_coef in [(0.0, "k3", 0.0), (0.04, "k3", 0.01)]:
                    cfg = {"loss": "cispo", "cispo_max": cap, "clip_low": 0.2, "clip_high": 0.28, "dual_clip": None,
                           "ratio": ratio, "aggregation": agg, "kl": kind, "kl_coef": kl_coef, "entropy_coef": ent_coef}
                    cases.append(case(cfg))
    # SAPO under every aggregation and ratio level, at TRL's temperatures and at sharper ones
    for agg in ["grpo", "bnpo", "dapo", "dr_grpo"]:
        for ratio in ["token", "sequence"]:
            for tau_pos, tau_neg in [(1.0, 1.05), (4.0, 6.0)]:
                for kl_coef, kind, ent_coef in [(0.0, "k3", 0.0), (0.04, "k3", 0.01)]:
                    cfg = {"loss": "sapo", "sapo_tau_pos": tau_pos, "sapo_tau_neg": tau_neg, "clip_low": 0.2,
                           "clip_high": 0.28, "dual_clip": None, "ratio": ratio, "aggregation": agg, "kl": kind,
                           "kl_coef": kl_coef, "entropy_coef": ent_coef}
                    cases.append(case(cfg))
    # verl's seq-mean-token-sum under both ratio levels, with and without dual clip, KL and entropy
    for ratio in ["token", "sequence"]:
        for dual in [None, 3.0]:
            for kl_coef, kind, ent_coef in [(0.0, "k3", 0.0), (0.04, "k3", 0.01), (0.1, "k1", 0.0), (0.1, "k2", 0.0)]:
                cfg = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": dual, "ratio": ratio,
                       "aggregation": "seq_sum", "kl": kind, "kl_coef": kl_coef, "entropy_coef": ent_coef}
                cases.append(case(cfg))
    # LUSPO from TRL's own formula: seq_sum with the sequence ratio, a clip that binds (the
    # sequence ratios are 0.91, 1.17, 0.76 and 1.06: with the advantages negated, 0.91 and 0.76
    # pass 1 - 0.05 against a negative advantage and 1.17 passes 1 + 0.05 against a positive one)
    # and one that does not
    for eps in [0.05, 0.28]:
        cfg = {"clip_low": eps, "clip_high": eps, "dual_clip": None, "ratio": "sequence", "aggregation": "seq_sum",
               "kl": "k3", "kl_coef": 0.0, "entropy_coef": 0.0, "luspo": True, "negate_advantages": True}
        x = logp.clone().requires_grad_(True)
        loss = luspo_trl(x, old, -adv, mask, cfg, totals)
        loss.backward()
        cases.append({"config": cfg, "loss": loss.item(), "grad": x.grad.tolist()})
    # the sampler's log-probs for the importance-sampling correction (`old` is then the learner's
    # own at the start of the step), from a generator of their own so that the cases above keep
    # their values
    g = torch.Generator().manual_seed(7)
    sampling = (old + 0.5 * torch.randn(b, t, generator=g)) * mask
    cap = 1.5
    correction = {}
    for mode in ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]:
        w, flat, flat_raw = is_weights(old, sampling, mask, mode, cap)
        correction[mode] = {"weights": w.tolist(), "min": flat.min().item(), "mean": flat.mean().item(),
                            "max": flat.max().item(), "capped_frac": (flat_raw > cap).float().mean().item()}
        for agg in ["grpo", "dapo"]:
            for ratio in ["token", "sequence"]:
                for kl_coef, kind, ent_coef in [(0.0, "k3", 0.0), (0.04, "k3", 0.01)]:
                    cfg = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": None, "ratio": ratio,
                           "aggregation": agg, "kl": kind, "kl_coef": kl_coef, "entropy_coef": ent_coef,
                           "correction": mode}
                    cases.append(case(cfg, w))
        cfg = {"loss": "cispo", "cispo_max": 5.0, "clip_low": 0.2, "clip_high": 0.28, "dual_clip": None,
               "ratio": "token", "aggregation": "dapo", "kl": "k3", "kl_coef": 0.0, "entropy_coef": 0.0,
               "correction": mode}
        cases.append(case(cfg, w))
    # off-policy sequence masking against the sampler's log-probs, alone and with the correction's
    # weights (the learner's own log-probs `old` the old policy), at thresholds that mask both
    # negative-advantage sequences (their mean sampler-minus-policy log-probs are -0.55 and -1.08),
    # one of them, and none
    truncated = is_weights(old, sampling, mask, "token_truncate", cap)[0]
    for delta in [-2.0, -0.8, 0.0]:
        for agg in ["grpo", "dapo"]:
            for mode, w in [(None, None), ("token_truncate", truncated)]:
                cfg = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": None, "ratio": "token", "aggregation": agg,
                       "kl": "k3", "kl_coef": 0.04, "entropy_coef": 0.01, "off_policy_mask": delta}
                if mode:
                    cfg["correction"] = mode
                cases.append(case(cfg, w, sampling))
    return {"logp": logp.tolist(), "old": old.tolist(), "ref": ref.tolist(), "entropy": ent.tolist(),
            "advantages": adv.tolist(), "mask": mask.tolist(), "totals": totals, "cases": cases,
            "sampling": sampling.tolist(), "correction_cap": cap, "correction": correction}


def five_rows(seed, spread, old_scale=2.5, mask_old=False):
    """A padded batch of 5 rows of 6, 3, 5, 1 and 4 completion tokens (of 6) drawn after
    seeding with `seed`: the mask, behaviour log-probs `old` (zero on padding with `mask_old`),
    current log-probs `spread` away from them, reference log-probs, entropies and per-row
    advantages."""
    torch.manual_seed(seed)
    lengths = [6, 3, 5, 1, 4]
    b, t = len(lengths), 6
    mask = torch.tensor([[1.0 if j < n else 0.0 for j in range(t)] for n in lengths])
    old = -torch.rand(b, t) * old_scale
    if mask_old:
        old = old * mask
    logp = old + spread * torch.randn(b, t)
    ref = logp + 0.2 * torch.randn(b, t)
    ent = torch.rand(b, t) * 2
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5, 0.9])[:, None].expand(b, t).contiguous()
    return mask, old, logp, ref, ent, adv


def batch_json(mask, old, logp, ref, ent, adv, totals, cases):
    """A fixture of one batch and its cases."""
    return {"logp": logp.tolist(), "old": old.tolist(), "ref": ref.tolist(), "entropy": ent.tolist(),
            "advantages": adv.tolist(), "mask": mask.tolist(), "totals": totals, "cases": cases}


def cov_select(old, adv, mask, cfg):
    """The tokens verl's Clip-Cov / KL-Cov pick, with its formulas evaluated at the start of the
    optimizer step (log_prob = old_log_prob: the covariance of the log-probs the batch was sampled
    with, and no token clipped by origin, every ratio being 1). Clip-Cov draws clip_num of its
    candidates at random (torch.randperm); the cases here have at most clip_num candidates, so
    every candidate is picked whatever the draw."""
    if cfg["loss"] == "kl_cov":
        valid = mask > 0
        valid_idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
        a, lp = adv[valid].reshape(-1), old[valid].reshape(-1)
        cov = (a - a.mean()) * (lp - lp.mean())
        k = max(1, int(len(cov) * cfg["kl_cov_ratio"]))
        picked = valid_idx[torch.topk(cov, k, largest=True).indices]
        selected = torch.zeros(mask.numel())
        selected[picked] = 1.0
        return selected.reshape(mask.shape), k
    masked_mean = lambda x: (x * mask).sum() / mask.sum()
    cov = (adv - masked_mean(adv)) * (old - masked_mean(old))
    cov[mask == 0] = -torch.inf
    clip_num = max(int(cfg["clip_cov_ratio"] * mask.sum().item()), 1)
    candidates = (cov < cfg["clip_cov_ub"]) & (cov > cfg["clip_cov_lb"]) & (mask > 0)
    assert 0 < candidates.sum().item() <= clip_num, (candidates.sum().item(), clip_num)
    return candidates.float(), clip_num


def covariance():
    """Clip-Cov and KL-Cov (verl's `policy_loss = "clip_cov"` / `"kl_cov"`, from the Entropy
    Mechanism paper's code): the tokens each picks and the loss and gradient with them, under the
    token-mean and sequence-mean aggregations, alone and with KL and entropy terms."""
    mask, old, logp, ref, ent, adv = five_rows(11, 0.3, old_scale=3.0, mask_old=True)
    b, t = mask.shape
    tokens = mask.sum().item()
    totals = {"sequences": b, "tokens": tokens, "micro_batches": 1, "max_completion_length": t}
    cases = []
    for sel_cfg in [{"loss": "kl_cov", "kl_cov_ratio": 0.2, "kl_cov_coef": 1.0},
                    {"loss": "kl_cov", "kl_cov_ratio": 0.5, "kl_cov_coef": 0.3},
                    {"loss": "kl_cov", "kl_cov_ratio": 1e-4, "kl_cov_coef": 2.0},
                    {"loss": "clip_cov", "clip_cov_ratio": 0.2, "clip_cov_lb": 0.6, "clip_cov_ub": 5.0},
                    {"loss": "clip_cov", "clip_cov_ratio": 0.5, "clip_cov_lb": -0.1, "clip_cov_ub": 0.4}]:
        selected, count = cov_select(old, adv, mask, sel_cfg)
        for agg in ["dapo", "grpo"]:
            for kl_coef, kind, ent_coef in [(0.0, "k3", 0.0), (0.04, "k3", 0.01)]:
                cfg = dict(sel_cfg, clip_low=0.2, clip_high=0.28, dual_clip=None, ratio="token", aggregation=agg,
                           kl=kind, kl_coef=kl_coef, entropy_coef=ent_coef)
                x = logp.clone().requires_grad_(True)
                loss = grpo_loss(x, old, adv, mask, ref, ent, cfg, totals, selected=selected)
                loss.backward()
                cases.append({"config": cfg, "selected": selected.tolist(), "count": count,
                              "loss": loss.item(), "grad": x.grad.tolist()})
    return batch_json(mask, old, logp, ref, ent, adv, totals, cases)


def dppo():
    """DPPO-Binary-TV and -KL (verl's `policy_loss = "dppo_tv"` / `"dppo_kl"`): the loss, its
    gradient and the share of tokens outside the trust region, with regions that bind on some
    tokens and a cap that binds on some ratios."""
    mask, old, logp, ref, ent, adv = five_rows(13, 0.6)
    b, t = mask.shape
    totals = {"sequences": b, "tokens": mask.sum().item(), "micro_batches": 1, "max_completion_length": t}
    cases = []
    for loss, regions in [("dppo_tv", [(0.01, 0.1), (0.2, 0.2)]), ("dppo_kl", [(0.001, 0.02), (0.05, 0.2)])]:
        for low, high in regions:
            for cap in [1.5, 3.0]:
                for agg in ["dapo", "grpo"]:
                    for kl_coef, kind, ent_coef in [(0.0, "k3", 0.0), (0.04, "k3", 0.01)]:
                        cfg = {"loss": loss, "dppo_low": low, "dppo_high": high, "dppo_cap": cap, "clip_low": 0.2,
                               "clip_high": 0.28, "dual_clip": None, "ratio": "token", "aggregation": agg,
                               "kl": kind, "kl_coef": kl_coef, "entropy_coef": ent_coef}
                        x = logp.clone().requires_grad_(True)
                        value = grpo_loss(x, old, adv, mask, ref, ent, cfg, totals)
                        value.backward()
                        # the tokens outside the region, by the advantage's sign (over valid tokens)
                        outside = 1.0 - dppo_inside(logp, old, adv, cfg)
                        n = mask.sum()
                        cases.append({"config": cfg, "loss": value.item(), "grad": x.grad.tolist(),
                                      "outside_negative": ((outside * (adv <= 0) * mask).sum() / n).item(),
                                      "outside_positive": ((outside * (adv > 0) * mask).sum() / n).item()})
    return batch_json(mask, old, logp, ref, ent, adv, totals, cases)


def gmpo_gpg():
    """GMPO (verl's `compute_policy_loss_geo_mean`) and GPG (`compute_policy_loss_gpg`), written
    out from verl's code: a micro-batch of 5 sequences of an optimizer step of 10. GMPO's term is
    verl's `torch.mean` over the micro-batch's sequences (times 5/10, the micro-batch's share of
    the step), its KL and entropy terms aggregated seq-mean-token-mean; GPG's `-A log pi` under
    the case's aggregation. The advantages vary within rows (PPO-style token advantages, one row
    of both signs and a zero) and between them."""
    mask, old, logp, ref, ent, adv = five_rows(21, 0.5)
    b, t = mask.shape
    adv = adv.clone()
    adv[2] = torch.tensor([0.3, -0.4, 0.0, 0.8, 0.2, 0.1])  # token-level, both signs and a zero
    totals = {"sequences": 10, "tokens": 2 * mask.sum().item(), "micro_batches": 2, "max_completion_length": t}
    share = b / totals["sequences"]
    cases = []
    for low, high in [(0.4, 0.4), (0.1, 0.2)]:
        for kl_coef, kind, ent_coef in [(0.0, "k3", 0.0), (0.04, "k3", 0.01)]:
            x = logp.clone().requires_grad_(True)
            neg_kl = x - old
            sgn = torch.sign(adv)
            clamp = torch.clamp(neg_kl, -low, high)
            neg_kl_min = sgn * torch.min(sgn * neg_kl, sgn * clamp)
            n = mask.sum(-1)
            ratio = torch.exp((neg_kl_min * mask).sum(-1) / (n + 1e-8))
            a = (adv * mask).sum(-1) / (n + 1e-8)
            pg = torch.mean(-a * ratio) * share
            aux = kl_coef * kl(x, ref, kind) - ent_coef * ent
            loss = pg + ((aux * mask).sum(-1) / n).sum() / totals["sequences"]
            loss.backward()
            clipped = torch.ne(neg_kl, clamp).float()
            valid = mask.sum()
            cases.append({"config": {"loss": "geo_mean", "clip_low": low, "clip_high": high, "dual_clip": None,
                                     "ratio": "token", "aggregation": "grpo", "kl": kind, "kl_coef": kl_coef,
                                     "entropy_coef": ent_coef},
                          "loss": loss.item(), "grad": x.grad.tolist(),
                          "clip_high_frac": ((clipped * (adv > 0) * mask).sum() / valid).item(),
                          "clip_low_frac": ((clipped * (adv < 0) * mask).sum() / valid).item()})
    for agg in ["dapo", "grpo"]:
        for kl_coef, kind, ent_coef in [(0.0, "k3", 0.0), (0.04, "k3", 0.01)]:
            cfg = {"loss": "gpg", "clip_low": 0.2, "clip_high": 0.28, "dual_clip": None, "ratio": "token",
                   "aggregation": agg, "kl": kind, "kl_coef": kl_coef, "entropy_coef": ent_coef}
            x = logp.clone().requires_grad_(True)
            per = -x * adv + kl_coef * kl(x, ref, kind) - ent_coef * ent
            m = per * mask
            if agg == "dapo":
                loss = m.sum() / totals["tokens"]
            else:
                loss = (m.sum(-1) / mask.sum(-1)).sum() / totals["sequences"]
            loss.backward()
            cases.append({"config": cfg, "loss": loss.item(), "grad": x.grad.tolist(),
                          "clip_high_frac": 0.0, "clip_low_frac": 0.0})
    return batch_json(mask, old, logp, ref, ent, adv, totals, cases)


def top_entropy():
    """TRL's top_entropy_quantile: `get_high_entropy_mask` (torch.quantile of the valid tokens'
    entropies at 1 - rho, tokens at or above it kept) and the clipped surrogate's loss with the
    mask on the policy term (KL and entropy terms unmasked), at rho 0.2, 0.5 and 1/3 (a quantile
    that falls between two entropies)."""
    mask, old, logp, ref, ent, adv = five_rows(23, 0.3)
    b, t = mask.shape
    totals = {"sequences": b, "tokens": mask.sum().item(), "micro_batches": 1, "max_completion_length": t}
    cases = []
    for rho in [0.2, 0.5, 1.0 / 3.0]:
        threshold = torch.quantile(ent[mask.bool()].float(), 1 - rho)
        keep = ((ent * mask) >= threshold).float()
        for agg, kl_coef, ent_coef in [("dapo", 0.0, 0.0), ("grpo", 0.04, 0.01)]:
            cfg = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": None, "ratio": "token", "aggregation": agg,
                   "kl": "k3", "kl_coef": kl_coef, "entropy_coef": ent_coef, "top_entropy_quantile": rho}
            x = logp.clone().requires_grad_(True)
            loss = grpo_loss(x, old, adv, mask, ref, ent, cfg, totals, weights=keep)
            loss.backward()
            cases.append({"config": cfg, "keep": keep.tolist(), "loss": loss.item(), "grad": x.grad.tolist()})
    return batch_json(mask, old, logp, ref, ent, adv, totals, cases)


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


def padded_batch(seed):
    """A padded batch of unequal lengths: log-probs, behaviour log-probs, entropies, a mask."""
    torch.manual_seed(seed)
    lengths = [5, 2, 4, 1, 3, 5]
    b, t = len(lengths), 5
    mask = torch.tensor([[1.0 if j < n else 0.0 for j in range(t)] for n in lengths])
    old = -torch.rand(b, t) * 2.5  # some tokens above pi = 0.5, some below
    logp = old + 0.15 * torch.randn(b, t)
    ref = old + 0.1 * torch.randn(b, t)
    ent = torch.rand(b, t) * 2
    return lengths, mask, logp * mask, old * mask, ref * mask, ent * mask


def masked_whiten(x, mask):
    """verl masked_whiten: unbiased masked variance, eps 1e-8."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / n * n / (n - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def estimators():
    lengths, mask, logp, old, ref, ent = padded_batch(2)
    b, t = mask.shape
    scores = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.25], dtype=torch.float64)
    groups = [0, 0, 0, 1, 1, 1]
    gid = torch.tensor(groups)
    # RLOO: r_i - mean of the others in the group
    rloo = torch.zeros(b, dtype=torch.float64)
    for i in range(b):
        others = [scores[j] for j in range(b) if j != i and groups[j] == groups[i]]
        rloo[i] = scores[i] - sum(others) / len(others)
    last = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        last[i, n - 1] = 1.0
    # PPO / REINFORCE++ token rewards: -beta * k1(old, ref) on every token, the score at the last
    beta, gamma, lam = 0.05, 0.99, 0.95
    kl = (old - ref) * mask
    tok_r = (-beta * kl + scores.float()[:, None] * last) * mask
    returns = torch.zeros(b, t)
    running = torch.zeros(b)
    for j in reversed(range(t)):
        running = tok_r[:, j] + gamma * running * mask[:, j + 1] if j + 1 < t else tok_r[:, j]
        returns[:, j] = running
    returns = returns * mask
    rpp = masked_whiten(returns, mask)
    # REINFORCE++-baseline: score minus the group mean on every token, whitened
    means = torch.tensor([scores[gid == g].mean() for g in groups], dtype=torch.float64)
    rppb = masked_whiten((scores - means).float()[:, None] * mask, mask)
    # GAE over values
    torch.manual_seed(3)
    values = torch.randn(b, t) * 0.5 * mask
    adv = torch.zeros(b, t)
    last_gae = torch.zeros(b)
    for j in reversed(range(t)):
        nv = values[:, j + 1] if j + 1 < t else torch.zeros(b)
        delta = tok_r[:, j] + gamma * nv - values[:, j]
        cont = mask[:, j + 1] if j + 1 < t else torch.zeros(b)
        last_gae = delta + gamma * lam * last_gae * cont
        adv[:, j] = last_gae
    adv = adv * mask
    gae_returns = (adv + values) * mask
    whitened = masked_whiten(adv, mask)
    # AR: (alpha * pi_old + 1 - alpha) * A
    alpha = 0.3
    a_seq = torch.tensor([1.2, -0.7, 0.3, -1.5, 0.8, 0.0])[:, None] * mask
    ar = (alpha * torch.exp(old) + 1 - alpha) * a_seq * mask
    # on-policy distillation (slime's apply_opd_kl_to_advantages): A - coef * (old - teacher), on
    # the estimator's advantages (a_seq here); its own generator keeps the earlier values as they were
    gen = torch.Generator().manual_seed(11)
    teacher = (old - 0.8 * torch.rand(b, t, generator=gen) + 0.3 * torch.randn(b, t, generator=gen)) * mask
    opd_coef = 0.5
    reverse_kl = (old - teacher) * mask
    opd = (a_seq - opd_coef * reverse_kl) * mask
    # EM-RL rewards
    rows = lambda x: [x[i, :n].tolist() for i, n in enumerate(lengths)]
    em_seq = (old * mask).sum(-1)
    em_tok = -(ent * mask).sum(-1)
    # GDPO (verl's compute_gdpo_outcome_advantage): each reward part GRPO-normalised within its
    # group (torch.std, eps 1e-6; or only centred, norm_adv_by_std_in_grpo = False), the parts
    # summed by their weights, masked_whiten over the response tokens. Part 1 is constant within
    # group 0, so it adds nothing there.
    gdpo_parts = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
                               [1.0, 1.0, 1.0, 0.0, 1.0, 0.0],
                               [0.9, -0.7, 0.6, 0.8, -0.9, -0.6]], dtype=torch.float64)
    gdpo_weights = [1.0, 0.1, 0.5]
    gdpo_eps = 1e-6
    gdpo = {}
    for name, by_std in [("gdpo", True), ("gdpo_no_std", False)]:
        total = torch.zeros(b, dtype=torch.float64)
        for part, w in zip(gdpo_parts, gdpo_weights):
            normalised = torch.zeros(b, dtype=torch.float64)
            for g in set(groups):
                members = part[gid == g]
                centred = members - members.mean()
                normalised[gid == g] = centred / (members.std() + gdpo_eps) if by_std else centred
            total += w * normalised
        gdpo[name] = rows(masked_whiten(total.float()[:, None] * mask, mask))
    # GRPO pass@k (verl's compute_grpo_passk_outcome_advantage): the group's best response gets
    # r_max - r_second (/ (torch.std + eps) with norm_adv_by_std_in_grpo), every other one 0; on
    # the scores and on scores whose best responses tie
    passk_eps = 1e-6
    passk = {}
    for key, sc in [("scores", scores), ("tied", torch.tensor([1.0, 1.0, 0.0, 0.5, 0.0, 0.5], dtype=torch.float64))]:
        for by_std in [True, False]:
            adv_k = torch.zeros(b, dtype=torch.float64)
            for g in sorted(set(groups)):
                idx = [i for i in range(b) if groups[i] == g]
                r = sc[idx]
                top, top_idx = torch.topk(r, 2)
                a = top[0] - top[1]
                if by_std:
                    a = a / (torch.std(r) + passk_eps)
                adv_k[idx[top_idx[0].item()]] = a
            passk[f"{key}_{'std' if by_std else 'no_std'}"] = {"scores": sc.tolist(), "advantages": adv_k.tolist()}
    # OPO (verl's compute_opo_outcome_advantage): r minus the group's length-weighted mean reward
    lens = torch.tensor(lengths, dtype=torch.float64)
    opo = torch.zeros(b, dtype=torch.float64)
    for g in set(groups):
        sel = gid == g
        opo[sel] = scores[sel] - (lens[sel] * scores[sel]).sum() / lens[sel].sum()
    # ReMax (verl's compute_remax_outcome_advantage): the returns-to-go of the token rewards (the
    # score on the last token) minus the greedy completion's reward, on every valid token
    remax_baselines = torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0, 1.0], dtype=torch.float64)
    outcome = torch.zeros(b, t, dtype=torch.float64)
    for i, n in enumerate(lengths):
        outcome[i, n - 1] = scores[i]
    returns = (outcome * mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    remax = returns - remax_baselines.unsqueeze(-1) * mask
    # adaptive KL controller: a few updates
    ctl = []
    coef = 0.2
    for kl_value, n in [(0.05, 64), (0.3, 64), (0.1, 128), (0.0, 32)]:
        err = min(max(kl_value / 0.1 - 1, -0.2), 0.2)
        coef = coef * (1 + err * n / 10000)
        ctl.append({"kl": kl_value, "n": n, "beta": coef})
    return {"lengths": lengths, "gdpo_parts": gdpo_parts.tolist(), "gdpo_weights": gdpo_weights,
            "gdpo_eps": gdpo_eps, "gdpo": gdpo["gdpo"], "gdpo_no_std": gdpo["gdpo_no_std"],
            "passk_eps": passk_eps, "grpo_passk": passk, "opo": opo.tolist(),
            "remax_baselines": remax_baselines.tolist(), "remax": rows(remax.float()), "old": rows(old), "ref": rows(ref), "entropy": rows(ent),
            "scores": scores.tolist(), "groups": groups, "beta": beta, "gamma": gamma, "lambda": lam,
            "rloo": rloo.tolist(), "token_rewards": rows(tok_r), "reinforce_pp": rows(rpp),
            "reinforce_pp_baseline": rows(rppb), "values": rows(values), "gae_advantages": rows(adv),
            "gae_returns": rows(gae_returns), "gae_whitened": rows(whitened), "alpha": alpha,
            "advantages": rows(a_seq), "ar": rows(ar), "teacher": rows(teacher), "opd_coef": opd_coef,
            "opd": rows(opd), "opd_reverse_kl": rows(reverse_kl), "em_sequence": em_seq.tolist(),
            "em_token": em_tok.tolist(), "kl_controller": {"beta0": 0.2, "target": 0.1, "horizon": 10000,
                                                            "updates": ctl}}


def value():
    lengths, mask, *_ = padded_batch(4)
    b, t = mask.shape
    torch.manual_seed(5)
    # the padding holds values too (as a padded batch does): only the mask may keep them out
    v = torch.randn(b, t)
    old_v = v + 0.4 * torch.randn(b, t)
    ret = torch.randn(b, t)
    tokens = float(mask.sum()) + 7.0  # the step holds more tokens than this micro-batch
    cases = []
    for clip in [None, 0.2, 0.5]:
        x = v.clone().requires_grad_(True)
        err = (x - ret) ** 2
        # verl's vf_clipfrac: the masked mean of (clipped error > unclipped error)
        clipfrac = 0.0
        if clip is not None:
            vc = torch.max(torch.min(x, old_v + clip), old_v - clip)
            err_clipped = (vc - ret) ** 2
            clipfrac = ((err_clipped > err).float() * mask).sum().item() / mask.sum().item()
            err = torch.max(err, err_clipped)
        loss = 0.5 * (err * mask).sum() / tokens
        loss.backward()
        cases.append({"clip": clip, "loss": loss.item(), "grad": x.grad.tolist(), "clip_frac": clipfrac,
                      "value_mean": ((v * mask).sum() / mask.sum()).item(), "valid_tokens": mask.sum().item()})
    return {"values": v.tolist(), "old_values": old_v.tolist(), "returns": ret.tolist(),
            "mask": mask.tolist(), "tokens": tokens, "cases": cases}


def dpo():
    """TRL's DPOTrainer losses (and CPOTrainer's SimPO), over a micro-batch of 5 pairs of an
    optimizer step of 8 pairs and 40 chosen tokens; RPO adds rpo_alpha x the chosen completions'
    token-mean NLL (TRL's nll_loss, over the step's chosen tokens)."""
    torch.manual_seed(6)
    n = 5
    pc = -torch.rand(n) * 20
    pr = -torch.rand(n) * 20
    rc = pc + torch.randn(n) * 2
    rr = pr + torch.randn(n) * 2
    # one pair at the reference, as every pair is at DPO's first step: its margin is exactly 0
    rc[2], rr[2] = pc[2], pr[2]
    lc = torch.tensor([3.0, 7.0, 1.0, 12.0, 5.0])
    lr = torch.tensor([4.0, 2.0, 9.0, 6.0, 5.0])
    total = 8
    total_chosen_tokens = 40
    cases = []
    # (loss type, beta, label smoothing, extra config: simpo_gamma, discopop_tau, rpo_alpha)
    specs = [("sigmoid", 0.1, 0.0, {}), ("sigmoid", 0.5, 0.0, {}), ("sigmoid", 0.1, 0.2, {}),
             ("ipo", 0.1, 0.0, {}), ("ipo", 0.5, 0.0, {}), ("robust", 0.1, 0.1, {}),
             ("robust", 0.3, 0.3, {}), ("hinge", 0.1, 0.0, {}), ("hinge", 0.5, 0.0, {}),
             ("exo_pair", 0.1, 0.0, {}), ("exo_pair", 0.5, 0.2, {}),
             ("nca_pair", 0.1, 0.0, {}), ("nca_pair", 0.5, 0.0, {}),
             ("sppo_hard", 0.1, 0.0, {}), ("sppo_hard", 0.5, 0.0, {}),
             ("apo_zero", 0.1, 0.0, {}), ("apo_zero", 0.5, 0.0, {}),
             ("apo_down", 0.1, 0.0, {}), ("apo_down", 0.5, 0.0, {}),
             ("discopop", 0.1, 0.0, {"discopop_tau": 0.05}), ("discopop", 0.5, 0.0, {"discopop_tau": 0.2}),
             ("simpo", 2.0, 0.0, {"simpo_gamma": 0.5}), ("simpo", 2.5, 0.1, {"simpo_gamma": 1.0}),
             ("sigmoid", 0.1, 0.0, {"rpo_alpha": 1.0}), ("simpo", 2.0, 0.0, {"simpo_gamma": 0.5, "rpo_alpha": 0.5})]
    for loss_type, beta, eps, extra in specs:
        c = pc.clone().requires_grad_(True)
        r = pr.clone().requires_grad_(True)
        if loss_type == "simpo":
            hw, hl = c / lc, r / lr  # CPOTrainer: length-averaged log-probs, no reference
        else:
            hw, hl = c - rc, r - rr
        logits = hw - hl
        z = beta * logits
        if loss_type == "sigmoid":
            per = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        elif loss_type == "robust":
            per = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif loss_type == "hinge":
            per = torch.relu(1 - z)
        elif loss_type == "ipo":
            per = (hw / lc - hl / lr - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            e = eps if eps != 0 else 1e-3
            per = z.sigmoid() * (F.logsigmoid(z) - math.log(1 - e)) + (-z).sigmoid() * (F.logsigmoid(-z) - math.log(e))
        elif loss_type == "nca_pair":
            cw, rl = hw * beta, hl * beta
            per = -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-rl)
        elif loss_type == "sppo_hard":
            per = (hw - 0.5 / beta) ** 2 + (hl + 0.5 / beta) ** 2
        elif loss_type == "apo_zero":
            per = (1 - torch.sigmoid(beta * hw)) + torch.sigmoid(beta * hl)
        elif loss_type == "apo_down":
            per = torch.sigmoid(beta * hw) + (1 - torch.sigmoid(beta * (hw - hl)))
        elif loss_type == "discopop":
            m = torch.sigmoid(z / extra["discopop_tau"])
            per = -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
        else:  # simpo
            u = logits - extra["simpo_gamma"] / beta
            per = -F.logsigmoid(beta * u) * (1 - eps) - F.logsigmoid(-beta * u) * eps
        loss = per.sum() / total
        if extra.get("rpo_alpha"):
            loss = loss + extra["rpo_alpha"] * (-c.sum() / total_chosen_tokens)
        loss.backward()
        rw, rl = (beta * hw).detach(), (beta * hl).detach()
        cases.append({"loss_type": loss_type, "beta": beta, "label_smoothing": eps, **extra, "loss": loss.item(),
                      "grad_chosen": c.grad.tolist(), "grad_rejected": r.grad.tolist(),
                      "reward_accuracy": (rw > rl).float().sum().item(), "margin": (rw - rl).sum().item(),
                      "chosen_reward": rw.sum().item(), "rejected_reward": rl.sum().item()})
    return {"chosen": pc.tolist(), "rejected": pr.tolist(), "ref_chosen": rc.tolist(), "ref_rejected": rr.tolist(),
            "chosen_tokens": lc.tolist(), "rejected_tokens": lr.tolist(), "total_pairs": total,
            "total_chosen_tokens": total_chosen_tokens, "cases": cases}


def kto():
    """TRL's KTOTrainer loss (loss_type "kto" and "apo_zero_unpaired") over a micro-batch of 7
    unpaired examples of an optimizer step of 10: the reference point z0 is the mean of
    log pi(y'|x) - log pi_ref(y'|x) over the step's mismatched pairs, detached and clamped at 0;
    the losses, weighted by desirable_weight / undesirable_weight, are summed over the step's
    examples (TRL's nanmean over the step's batch) and divided by them."""
    torch.manual_seed(8)
    n, total = 7, 10
    logps = -torch.rand(n) * 20
    ref = logps + torch.randn(n) * 2
    ref[3] = logps[3]  # one example at the reference
    labels = [True, False, True, True, False, False, True]
    # the step's mismatched pairs: one set whose mean log-ratio is positive, one negative (z0 = 0)
    kl_policy = -torch.rand(total) * 20
    kl_sets = {"positive": kl_policy - torch.rand(total) * 1.5, "negative": kl_policy + torch.rand(total) * 1.5}
    cases = []
    for loss_type, beta, wd, wu, kl_set in [("kto", 0.1, 1.0, 1.0, "positive"), ("kto", 0.5, 1.0, 1.0, "positive"),
                                            ("kto", 0.1, 1.33, 1.0, "negative"), ("kto", 0.3, 1.0, 2.0, "positive"),
                                            ("apo_zero_unpaired", 0.1, 1.0, 1.0, "positive"),
                                            ("apo_zero_unpaired", 0.5, 1.0, 1.5, "positive")]:
        x = logps.clone().requires_grad_(True)
        if loss_type == "kto":
            z0 = (kl_policy - kl_sets[kl_set]).mean().detach().clamp(min=0)
        else:
            z0 = torch.zeros(())
        d = torch.tensor(labels)
        h = x - ref
        if loss_type == "kto":
            chosen = 1 - torch.sigmoid(beta * (h[d] - z0))
            rejected = 1 - torch.sigmoid(beta * (z0 - h[~d]))
        else:
            chosen = 1 - torch.sigmoid(beta * h[d])
            rejected = torch.sigmoid(beta * h[~d])
        losses = torch.cat((wd * chosen, wu * rejected))
        loss = losses.sum() / total
        loss.backward()
        r = (beta * h).detach()
        cases.append({"loss_type": loss_type, "beta": beta, "desirable_weight": wd, "undesirable_weight": wu,
                      "kl_set": kl_set, "kl": float(z0), "loss": loss.item(), "grad": x.grad.tolist(),
                      "chosen_reward": r[d].sum().item(), "rejected_reward": r[~d].sum().item()})
    return {"logps": logps.tolist(), "ref_logps": ref.tolist(), "labels": labels, "total": total,
            "kl_policy": kl_policy.tolist(), "kl_reference": {k: v.tolist() for k, v in kl_sets.items()},
            "cases": cases}


def lopti():
    """Lopti's two passes (spec 1.4) at the same parameters, with AR applied first: token-mean
    dual-clip loss over all valid tokens, KL (k3) and entropy masked to the active group."""
    lengths, mask, logp, old, ref, ent = padded_batch(7)
    a_seq = torch.tensor([1.1, -0.6, 0.4, -1.3, 0.9, -0.2])[:, None] * mask
    cfg = {"clip_low": 0.2, "clip_high": 0.24, "dual_clip": 10.0, "kl_coef": 0.05, "entropy_coef": 0.01}
    tokens = float(mask.sum())

    def loss_of(x, adv, active):
        r = torch.exp((x - old).clamp(-20, 20))
        pg = torch.max(-adv * r, -adv * r.clamp(1 - cfg["clip_low"], 1 + cfg["clip_high"]))
        pg = torch.where(adv < 0, torch.min(pg, -adv * cfg["dual_clip"]), pg)
        k = kl(x, ref, "k3")
        per = pg + cfg["kl_coef"] * k * active - cfg["entropy_coef"] * ent * active
        return (per * mask).sum() / tokens

    out = {"lengths": lengths, "logp": [logp[i, :n].tolist() for i, n in enumerate(lengths)],
           "old": [old[i, :n].tolist() for i, n in enumerate(lengths)],
           "ref": [ref[i, :n].tolist() for i, n in enumerate(lengths)],
           "entropy": [ent[i, :n].tolist() for i, n in enumerate(lengths)],
           "advantages": [a_seq[i, :n].tolist() for i, n in enumerate(lengths)], "config": cfg, "cases": []}
    for alpha, eta in [(0.0, 0.5), (0.3, 0.5), (0.0, 0.4), (0.3, -0.5)]:
        adv = (alpha * torch.exp(old) + 1 - alpha) * a_seq * mask
        p = torch.exp(old)
        low = (p < eta) if eta > 0 else (p >= -eta)
        low = low.float() * mask
        high = (1 - low) * mask
        case = {"alpha": alpha, "eta": eta, "low_tokens": float(low.sum())}
        for name, adv_p, act in [("single", adv, mask), ("first", adv * low, low), ("second", adv * high, high)]:
            x = logp.clone().requires_grad_(True)
            loss = loss_of(x, adv_p, act)
            loss.backward()
            case[name] = {"loss": loss.item(), "grad": [x.grad[i, :n].tolist() for i, n in enumerate(lengths)]}
        out["cases"].append(case)
    return out


class RunningMoments:
    """TRL's RunningMoments (trl/trainer/utils.py) as BCO uses it, on one device: each update
    with a 0-dim tensor (a batch of one) moves the mean by delta * 1 / (count + 1)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs):
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        delta = xs_mean.double() - self.mean
        tot_count = self.count + xs_count
        old_sum = self.var * self.count + delta ** 2 * self.count * xs_count / tot_count
        self.mean += (delta * xs_count / tot_count).item()
        self.var = ((old_sum + xs_var * xs_count) / tot_count).item()
        self.count = tot_count


def dpo_coupled():
    """TRL's DPOTrainer losses that couple a batch's pairs, over a step of 6 pairs taken as one
    batch: aot and aot_pair (torch.sort of the batch's log-ratios, compared rank by rank with the
    label-smoothed sigmoid loss) and bco_pair (the rewards shifted by RunningMoments' mean, updated
    first with the batch's mean reward, after earlier updates); the loss is TRL's mean over the
    pairs, the gradient with respect to each pair's summed chosen and rejected log-probs."""
    torch.manual_seed(12)
    n = 6
    pc = -torch.rand(n, dtype=torch.float64) * 20
    pr = -torch.rand(n, dtype=torch.float64) * 20
    rc = pc + torch.randn(n, dtype=torch.float64) * 2
    rr = pr + torch.randn(n, dtype=torch.float64) * 2
    cases = []
    for loss_type, beta, eps, earlier in [("aot", 0.1, 0.0, []), ("aot", 0.5, 0.2, []),
                                          ("aot_pair", 0.1, 0.0, []), ("aot_pair", 0.3, 0.1, []),
                                          ("bco_pair", 0.1, 0.0, []), ("bco_pair", 0.5, 0.0, [0.3, -0.1])]:
        c = pc.clone().requires_grad_(True)
        r = pr.clone().requires_grad_(True)
        running = RunningMoments()
        for x in earlier:
            running.update(torch.tensor(x, dtype=torch.float64))
        if loss_type == "aot":
            s_pi, _ = torch.sort(c - r, dim=0)
            s_ref, _ = torch.sort(rc - rr, dim=0)
            delta = s_pi - s_ref
            losses = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
        elif loss_type == "aot_pair":
            s_w, _ = torch.sort(c - rc, dim=0)
            s_l, _ = torch.sort(r - rr, dim=0)
            delta = s_w - s_l
            losses = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
        else:
            hw, hl = c - rc, r - rr
            rewards = torch.cat((beta * hw, beta * hl), 0).mean().detach()
            running.update(rewards)
            delta = running.mean
            losses = -F.logsigmoid(beta * hw - delta) - F.logsigmoid(-(beta * hl - delta))
        loss = losses.mean()
        loss.backward()
        cases.append({"loss_type": loss_type, "beta": beta, "label_smoothing": eps, "earlier": earlier,
                      "loss": loss.item(), "grad_chosen": c.grad.tolist(), "grad_rejected": r.grad.tolist(),
                      "running_mean": running.mean})
    return {"chosen": pc.tolist(), "rejected": pr.tolist(), "ref_chosen": rc.tolist(),
            "ref_rejected": rr.tolist(), "cases": cases}


def m2po():
    """AReaL's M2PO masking (areal/trainer/ppo/actor.py: _apply_m2po_masking, _get_m2po_loss_mask):
    the second moments (old_logp - prox_logp)^2 of the valid tokens sorted in descending order,
    the suffix means, the first index where the mean of the rest falls below the threshold (all
    but one when none does); on ragged rows, pooled over the batch, at thresholds that mask some,
    none, and all but one."""
    torch.manual_seed(13)
    lengths = [5, 2, 4, 1, 3, 6]
    b, t = len(lengths), 6
    mask = torch.tensor([[j < n for j in range(t)] for n in lengths])
    prox = -torch.rand(b, t, dtype=torch.float64) * 3
    old = prox + torch.randn(b, t, dtype=torch.float64) * 0.3
    cases = []
    for threshold in [0.04, 0.01, 0.002, 1.0, 1e-9]:
        delta = old - prox
        m2 = delta * delta
        flat = mask.view(-1)
        selected = m2.view(-1)[flat]
        sorted_m2, indices = torch.sort(selected, descending=True)
        restored = torch.argsort(indices)
        n = sorted_m2.numel()
        suffix = sorted_m2.flip(0).cumsum(0).flip(0)
        counts = torch.arange(n, 0, -1, dtype=sorted_m2.dtype)
        below = torch.where(suffix / counts < threshold)[0]
        num = below[0].item() if len(below) > 0 else n - 1
        keep_sorted = torch.ones(n, dtype=torch.bool)
        keep_sorted[:num] = False
        full = torch.zeros_like(flat)
        full[flat] = keep_sorted[restored]
        kept = full.view(b, t)
        cases.append({"threshold": threshold, "kept": [[bool(kept[i, j]) for j in range(lengths[i])] for i in range(b)],
                      "masked": num, "m2": selected.mean().item()})
    return {"lengths": lengths, "proximal": [prox[i, :n].tolist() for i, n in enumerate(lengths)],
            "behaviour": [old[i, :n].tolist() for i, n in enumerate(lengths)], "cases": cases}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, fn in [("adamw", adamw), ("grpo", grpo), ("advantages", advantages),
                     ("estimators", estimators), ("value", value), ("dpo", dpo), ("lopti", lopti),
                     ("covariance", covariance), ("dppo", dppo), ("kto", kto),
                     ("gmpo_gpg", gmpo_gpg), ("top_entropy", top_entropy), ("dpo_coupled", dpo_coupled),
                     ("m2po", m2po)]:
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            json.dump(fn(), f)
    print("learner fixtures written")


if __name__ == "__main__":
    main()
