#!/usr/bin/env python3
"""HF transformers bf16 baseline on the GPU for a real-size shape with random weights: prefill
throughput of one forward pass and batch-1 `generate` tokens/s (its first call, then the best of the
warm calls), the figures `bioquant bench --device cuda` is compared with (run both in the same device
call: cards differ).

usage: hf_gpu_baseline.py [--shape llama3-8b] [--prompt 512] [--gen 64] [--reps 3]
Prints one JSON object.
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=5632, vocab_size=32000, rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=8192, **SHAPES[args.shape])
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.eval()
    for p in model.parameters():  # std 0.02, as bioquant's synthetic weights
        torch.nn.init.normal_(p, std=0.02)

    ids = torch.randint(0, config.vocab_size, (1, args.prompt), device="cuda")
    with torch.no_grad():
        model(ids)  # warm-up
        torch.cuda.synchronize()
        prefill = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            prefill.append(args.prompt / (time.perf_counter() - t0))

        short = ids[:, :8]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(short, max_new_tokens=args.gen, min_new_tokens=args.gen, do_sample=False)
        torch.cuda.synchronize()
        first = (out.shape[1] - short.shape[1]) / (time.perf_counter() - t0)
        decode = []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(short, max_new_tokens=args.gen, min_new_tokens=args.gen, do_sample=False)
            torch.cuda.synchronize()
            decode.append((out.shape[1] - short.shape[1]) / (time.perf_counter() - t0))

    print(json.dumps({
        "shape": args.shape, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "dtype": "bf16", "prefill_tokens": args.prompt, "prefill_tok_s": max(prefill), "prefill_all": prefill,
        "generate_tokens": args.gen, "generate_tok_s": max(decode), "generate_all": decode, "first_generate_tok_s": first,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
    }))


if __name__ == "__main__":
    main()
