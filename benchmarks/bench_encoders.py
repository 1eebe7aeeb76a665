"""SPHINX-1k's `get_image_features` for one image: what a call reads back from the device, and its time, against the
code before those reads were removed (main @ 14f6d7e), in the same run.

    .venv/bin/python benchmarks/bench_encoders.py [--device cpu|cuda] [--dtype bfloat16] [--depth short|real]

The four encoders at their real widths, one 448-px image (5 views): at full depth (`--depth real`, the default on a
GPU) or with 2 blocks per ViT and ConvNeXt stages of 1, 1, 2, 1 blocks (`--depth short`, the default on the CPU).
Before: the Q-Former was handed an all-ones mask, which transformers checks with `.all()`, a read from the device,
and the DINOv2 re-normalisation copied four constant tensors to the device on every call; each of those waits for
the device to finish what was queued. Counted per call, on any device, with a dispatch mode: reads of a device
value (`aten._local_scalar_dense`, `aten.is_nonzero`) and tensors made from host values (`aten.lift_fresh`); on CUDA also the
synchronisations that `torch.cuda.set_sync_debug_mode` reports. Times are medians of eager calls; on CUDA also with
the encoders captured in CUDA graphs (`torch.compile(backend="cudagraphs")`), which the launch-bound encoders
need to approach the card's matmul rate (`docs/gpu.md`). The outputs of both versions are checked to be equal.
"""

import argparse
import warnings
from collections import Counter
from contextlib import contextmanager

import torch
from bench_inference import timed
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_sphinx import SphinxConfig, SphinxModel
from modeling_sphinx.modeling_sphinx import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SphinxQFormer,
)

HOST_ROUND_TRIPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.lift_fresh")
SHORT = {"clip": {"depth": 2}, "dinov2": {"depth": 2}, "convnext": {"depths": [1, 1, 2, 1]}, "vision": 2, "qformer": 2}


def config(depth: str) -> SphinxConfig:
    """SPHINX-1k with its real encoders (and a one-layer LLM: only `hidden_size` matters to the projections)."""
    text = {"num_hidden_layers": 1, "intermediate_size": 256, "vocab_size": 1001}
    if depth == "real":
        return SphinxConfig.from_variant("sphinx-1k", text_config=text)
    real = SphinxConfig.from_variant("sphinx-1k", text_config=text)
    encoders = {}
    for name in ("clip", "convnext", "dinov2"):
        encoder = getattr(real, f"{name}_config")
        encoders[f"{name}_config"] = {
            "architecture": encoder.architecture,
            "model_args": {**(encoder.model_args or {}), **SHORT[name]},
        }
    qformer = {
        "model_type": "blip-2",
        "vision_config": {"num_hidden_layers": SHORT["vision"]},
        "qformer_config": {"num_hidden_layers": SHORT["qformer"]},
    }
    return SphinxConfig.from_variant("sphinx-1k", text_config=text, qformer_config=qformer, **encoders)


def qformer_with_a_mask(self, pixel_values):
    """`SphinxQFormer.forward` before: an all-ones mask over the image tokens."""
    image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
    return self.qformer(
        query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask
    ).last_hidden_state


def dinov2_statistics_per_call(self, views):
    """`SphinxModel.to_dinov2_statistics` before: the four constants made on the device at every call."""
    clip_mean, clip_std, mean, std = (
        torch.tensor(v, dtype=views.dtype, device=views.device).view(3, 1, 1)
        for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, IMAGENET_MEAN, IMAGENET_STD)
    )
    return views * (clip_std / std) + (clip_mean - mean) / std


@contextmanager
def before():
    saved = SphinxQFormer.forward, SphinxModel.to_dinov2_statistics
    SphinxQFormer.forward, SphinxModel.to_dinov2_statistics = qformer_with_a_mask, dinov2_statistics_per_call
    try:
        yield
    finally:
        SphinxQFormer.forward, SphinxModel.to_dinov2_statistics = saved


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(model, pixels, device: str) -> dict:
    with OpCounter() as counter:
        model.get_image_features(pixels)
    found = {"ops": sum(counter.ops.values()), **{name: counter.ops[name] for name in HOST_ROUND_TRIPS}}
    if device == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model.get_image_features(pixels)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found["synchronisations"] = sum("synchroniz" in str(w.message) for w in caught)
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--depth", choices=["short", "real"], help="default: real on a GPU, short on the CPU")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    depth = args.depth or ("real" if args.device == "cuda" else "short")
    torch.manual_seed(0)
    with torch.device(args.device):
        model = SphinxModel(config(depth)).to(getattr(torch, args.dtype)).eval()
    pixels = torch.randn(1, 3, 448, 448, device=args.device, dtype=getattr(torch, args.dtype))
    rows = {}
    with torch.inference_mode():
        with before():
            expected = model.get_image_features(pixels).pooler_output
            rows["before (14f6d7e)"] = count(model, pixels, args.device)
            rows["before (14f6d7e)"]["ms"] = 1e3 * timed(
                lambda: model.get_image_features(pixels), args.repeats, args.device
            )
        assert torch.equal(model.get_image_features(pixels).pooler_output, expected), "the outputs changed"
        rows["now"] = count(model, pixels, args.device)
        rows["now"]["ms"] = 1e3 * timed(lambda: model.get_image_features(pixels), args.repeats, args.device)
        if args.device == "cuda":
            graphed = torch.compile(model.get_image_features, backend="cudagraphs", fullgraph=True)
            graphed(pixels)  # captures the graphs
            rows["now, CUDA graphs"] = {"ms": 1e3 * timed(lambda: graphed(pixels), args.repeats, args.device)}
    print(f"device={args.device} dtype={args.dtype} depth={depth}, one 448-px image (5 views), get_image_features")
    columns = ["ops", *HOST_ROUND_TRIPS, "synchronisations", "ms"]
    print("| version | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in rows.items():
        cells = [f"{row[c]:.1f}" if c == "ms" else str(row.get(c, "")) for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
