#!/usr/bin/env python3
"""Golden values for LoRA, computed by Hugging Face PEFT on the tiny Qwen2 fixture model.

Writes model/tests/fixtures/tiny-qwen2-lora/:
  adapter_model.safetensors, adapter_config.json   a PEFT LoRA adapter (r = 4, alpha = 8, every
                             projection of both layers; lora_B drawn at random, so that the
                             adapter changes the model) as PEFT's save_pretrained writes it
  golden.safetensors         the padded batch's logits with the adapter, the same after
                             merge_and_unload, and the log-prob loss's gradients of some adapter
                             matrices (the base frozen, as PEFT trains it)
  golden.json                the loss and the batch (make_model_fixtures.py's padded batch)

Usage: python scripts/make_lora_fixtures.py   (after make_model_fixtures.py wrote tiny-qwen2)
Needs: pip install torch transformers peft safetensors   (CPU is enough)
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_model_fixtures import FIX, load_f32, padded_batch, positions  # noqa: E402

OUT = os.path.join(FIX, "tiny-qwen2-lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRADS = [
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight",
    "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
    "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight",
    "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
]


def main():
    from peft import LoraConfig, get_peft_model

    base = load_f32(os.path.join(FIX, "tiny-qwen2"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                                            bias="none", task_type="CAUSAL_LM"))
    torch.manual_seed(5)
    with torch.no_grad():  # PEFT starts B at zero (no change); a drawn B makes the adapter count
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(OUT, safe_serialization=True)
    readme = os.path.join(OUT, "README.md")  # PEFT's model card: not a fixture
    if os.path.exists(readme):
        os.remove(readme)

    ids, mask = padded_batch()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    scored = (mask[:, 1:] * mask[:, :-1]).float()
    loss = -(logp * scored).sum() / scored.sum()
    loss.backward()
    named = {n.replace(".default", ""): p for n, p in model.named_parameters()}
    tensors = {"logits": logits.detach().clone()}
    for n in GRADS:
        tensors[f"grad.{n}"] = named[n].grad.detach().clone()
    merged = model.merge_and_unload()
    with torch.no_grad():
        tensors["merged_logits"] = merged(input_ids=ids, attention_mask=mask,
                                          position_ids=positions(mask)).logits.clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "golden.safetensors"))
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "loss": loss.item(),
                   "peft": __import__("peft").__version__, "torch": torch.__version__}, f)
    print("LoRA fixtures written to", OUT)


if __name__ == "__main__":
    main()
