"""Decode/prefill speed of SPHINX against transformers' LLaVA, and batched vs per-view encoding.

    .venv/bin/python benchmarks/bench_inference.py [--device cpu|cuda] [--dtype float32|bfloat16]

Both models share one LLaMA text config and see sequences of the same length: SPHINX-1k geometry gives 1455
visual tokens; LLaVA gets a 532-px CLIP tower (38x38 = 1444 patch tokens) plus 11 more text tokens. Ratios are
measured in the same process and run; figures are recorded in benchmarks/README.md.
"""

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration

TEXT = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=32001,
    max_position_embeddings=4096,
)


def llava_config() -> LlavaConfig:
    """LLaVA with the same LLM and a tiny 532-px CLIP tower: 38 x 38 = 1444 patch tokens per image."""
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=532,
        patch_size=14,
    )
    return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_index=32000)


def timed(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generation_speed(model, inputs, new_tokens: int, repeats: int, device: str) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second), greedy, with the KV cache."""

    def run(n):
        return lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    run(2)()  # warm-up
    prefill = timed(run(1), repeats, device)
    total = timed(run(new_tokens + 1), repeats, device)
    return prefill, new_tokens / (total - prefill)


def per_view_features(sphinx_model, pixel_values):
    """Baseline: each view through each encoder separately (what a naive port does)."""
    model = sphinx_model.model
    views, _ = model.cut_views(pixel_values)
    outs = []
    for view in views.split(1):
        fused = [
            model.clip.forward_features(view),
            model.convnext_tokens(view),
            model.dinov2.forward_features(model.to_dinov2_statistics(view)),
        ]
        queries = model.qformer_proj(model.qformer(view))
        outs.append(torch.cat([queries, model.visual_proj(torch.cat(fused, -1))], 1))
    return torch.cat(outs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    sphinx_config = SphinxConfig.from_variant("sphinx-1k", tiny=True, text_config=dict(TEXT), image_token_id=32000)
    sphinx = SphinxForConditionalGeneration(sphinx_config).to(args.device, dtype).eval()
    n_visual = sphinx_config.num_image_tokens
    text_len = 40
    ids = torch.randint(3, 31000, (1, text_len), device=args.device)
    sphinx_ids = torch.cat([ids[:, :1], torch.full((1, n_visual), 32000, device=args.device), ids[:, 1:]], 1)
    sphinx_inputs = {
        "input_ids": sphinx_ids,
        "attention_mask": torch.ones_like(sphinx_ids),
        "pixel_values": torch.randn(1, 3, 448, 448, device=args.device, dtype=dtype),
    }

    llava = LlavaForConditionalGeneration(llava_config()).to(args.device, dtype).eval()
    llava_visual = (532 // 14) ** 2
    extra = n_visual - llava_visual
    llava_ids = torch.cat(
        [ids[:, :1], torch.full((1, llava_visual), 32000, device=args.device), ids[:, 1:], ids[:, 1 : 1 + extra]], 1
    )
    assert llava_ids.shape == sphinx_ids.shape
    llava_inputs = {
        "input_ids": llava_ids,
        "attention_mask": torch.ones_like(llava_ids),
        "pixel_values": torch.randn(1, 3, 532, 532, device=args.device, dtype=dtype),
    }
    for model in (sphinx, llava):
        model.generation_config.pad_token_id = 0

    with torch.inference_mode():
        s_prefill, s_decode = generation_speed(sphinx, sphinx_inputs, args.new_tokens, args.repeats, args.device)
        l_prefill, l_decode = generation_speed(llava, llava_inputs, args.new_tokens, args.repeats, args.device)
        images = torch.randn(4, 3, 448, 448, device=args.device, dtype=dtype)
        batched = timed(lambda: sphinx.model.get_image_features(images), args.repeats, args.device)
        looped = timed(lambda: per_view_features(sphinx, images), args.repeats, args.device)

    print(f"device={args.device} dtype={args.dtype} sequence={sphinx_ids.shape[1]} tokens, new={args.new_tokens}")
    print(f"decode tok/s   SPHINX {s_decode:8.1f}  LLaVA {l_decode:8.1f}  ratio {s_decode / l_decode:.3f}")
    print(f"prefill s      SPHINX {s_prefill:8.3f}  LLaVA {l_prefill:8.3f}  ratio {s_prefill / l_prefill:.3f}")
    print(f"image encode s batched {batched:8.3f}  per-view loop {looped:8.3f}  speed-up {looped / batched:.2f}x")


if __name__ == "__main__":
    main()
