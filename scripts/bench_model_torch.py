#!/usr/bin/env python3
"""PyTorch + transformers reference for scripts/bench_model.sh: the same model shapes, batch
sizes and thread count as learner/examples/bench_model.rs. Prints `BENCH <model> <train|sample>
<tokens/s>` lines."""
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
only = sys.argv[2] if len(sys.argv) > 2 else None
torch.set_num_threads(threads)
torch.manual_seed(0)

CASES = [
    ("tiny", Qwen2ForCausalLM, Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=768,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=True), 8, 256, 5),
    ("smollm2-135m", LlamaForCausalLM, LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True), 4, 256, 3),
]

for name, cls, config, b, t, reps in CASES:
    if only and only != name:
        continue
    model = cls(config).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (b, t))

    def step():
        logits = model(input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        loss = -logp.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    secs = (time.perf_counter() - start) / reps
    print(f"BENCH {name} train {b * t / secs:.1f}  # B={b} T={t}: {secs * 1e3:.0f} ms/step", flush=True)

    model.eval()
    prompts = torch.randint(0, config.vocab_size, (16, 32))
    with torch.no_grad():
        model.generate(prompts[:2], attention_mask=torch.ones_like(prompts[:2]), do_sample=True,
                       max_new_tokens=4, pad_token_id=0)
        start = time.perf_counter()
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=128,
                             min_new_tokens=128, pad_token_id=0, eos_token_id=None)
        secs = time.perf_counter() - start
    n = (out.shape[1] - 32) * 16
    print(f"BENCH {name} sample {n / secs:.1f}  # HF generate, batch 16, {n} new tokens in {secs:.1f} s", flush=True)
