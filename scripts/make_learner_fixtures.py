#!/usr/bin/env python3
"""Golden values for the learner, from PyTorch: AdamW steps with gradient clipping.

Writes learner/tests/fixtures/adamw.json. Needs: pip install torch
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


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "adamw.json"), "w") as f:
        json.dump(adamw(), f)
    print("learner fixtures written")


if __name__ == "__main__":
    main()
