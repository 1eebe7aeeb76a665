"""Training throughput and peak memory of SPHINX against transformers' LLaVA with the same LLM, same run.

    .venv/bin/python benchmarks/bench_sft.py [--device cpu|cuda] [--dtype float32|bfloat16] [--steps 6]

Both models share one LLaMA text config (the one `bench_inference.py` uses: 512 wide, 6 layers) and train on
batches of the same shape: 2 sequences of 1495 tokens (SPHINX-1k's 1455 visual tokens, or LLaVA's 1444 patch
tokens plus 11 more text tokens, then 39 text tokens), the loss on the last 32 tokens of each, as
`assistant_only_loss` would. One step is forward, backward and an AdamW update of everything that trains (the
vision towers frozen in both, as in the recipes). Each model runs in its own process so that its peak RSS
(or CUDA peak allocation) is its own; tokens/s is batch tokens over the median step time after one warm-up.
Target: SPHINX >= 0.9x LLaVA's throughput.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from bench_inference import TEXT, llava_config
from transformers import LlavaForConditionalGeneration

from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration

BATCH, TEXT_TOKENS, SUPERVISED = 2, 40, 32


def build(name: str, device: str, dtype: torch.dtype):
    """The model and one batch for it."""
    torch.manual_seed(0)
    ids = torch.randint(3, 31000, (BATCH, TEXT_TOKENS))
    if name == "sphinx":
        config = SphinxConfig.from_variant("sphinx-1k", tiny=True, text_config=dict(TEXT), image_token_id=32000)
        model = SphinxForConditionalGeneration(config)
        visual, side, extra = config.num_image_tokens, config.image_size, 0
    else:
        model = LlavaForConditionalGeneration(llava_config())
        model.model.vision_tower.requires_grad_(False)
        visual, side = (532 // 14) ** 2, 532
        extra = 1455 - visual
    sequence = torch.cat([ids[:, :1], torch.full((BATCH, visual), 32000), ids[:, 1:], ids[:, 1 : 1 + extra]], 1)
    labels = torch.full_like(sequence, -100)
    labels[:, -SUPERVISED:] = sequence[:, -SUPERVISED:]
    batch = {
        "input_ids": sequence,
        "attention_mask": torch.ones_like(sequence),
        "pixel_values": torch.randn(BATCH, 3, side, side),
        "labels": labels,
    }
    batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
    return model.to(device, dtype).train(), batch


def run_one(name: str, device: str, dtype: torch.dtype, steps: int) -> dict:
    model, batch = build(name, device, dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95))
    times = []
    for _ in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])
    tokens = batch["input_ids"].numel()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"step_s": step, "tokens_per_s": tokens / step, "peak_gib": peak, "tokens": tokens}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", choices=["sphinx", "llava"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model:
        print(json.dumps(run_one(args.model, args.device, getattr(torch, args.dtype), args.steps)))
        return
    results = {}
    for name in ("sphinx", "llava"):
        command = [sys.executable, __file__, "--model", name, "--device", args.device, "--dtype", args.dtype]
        output = subprocess.run([*command, "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        results[name] = json.loads(output.stdout.strip().splitlines()[-1])
    s, v = results["sphinx"], results["llava"]
    print(f"device={args.device} dtype={args.dtype} batch={BATCH}x{s['tokens'] // BATCH} tokens, {args.steps} steps")
    print(
        f"tokens/s  SPHINX {s['tokens_per_s']:8.1f}  LLaVA {v['tokens_per_s']:8.1f}  "
        f"ratio {s['tokens_per_s'] / v['tokens_per_s']:.3f} (target >= 0.9)"
    )
    print(f"step s    SPHINX {s['step_s']:8.3f}  LLaVA {v['step_s']:8.3f}")
    print(f"peak GiB  SPHINX {s['peak_gib']:8.2f}  LLaVA {v['peak_gib']:8.2f}")


if __name__ == "__main__":
    main()
