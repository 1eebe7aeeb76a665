"""Throughput of the default image processor against the Pillow path and plain torchvision, same run.

    .venv/bin/python benchmarks/bench_image_processor.py [--images DIR] [--batch 16] [--repeats 5] [--device cuda]

A batch of real photos (the repository's test fixtures by default: 7 photos and documents from 384x191 to
1000x872 px, repeated to `--batch` images) goes through each way of preprocessing, at SPHINX-1k's and
SPHINX-Tiny-1k's input sizes:
- `SphinxImageProcessorPil`: pad, then Pillow's resize (the path the default replaces);
- `SphinxImageProcessor` (the default): batched tensors; the resize is Pillow's own for 8-bit images in CPU
  memory and `pillow_resize` (the torch port) on accelerators;
- the torch port on this device: the default with `pillow_resize` as its `resize_images`;
- torchvision: the default with torchvision's bicubic antialiased resize as its `resize_images` (what
  transformers' torchvision backends do): fast, not exact.
Each call is timed from PIL images to the normalised `pixel_values` tensor; the median of `--repeats` is
reported as images/s, with the largest difference from the Pillow path in 8-bit levels.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF
from transformers.image_utils import OPENAI_CLIP_STD

from modeling_sphinx import SphinxImageProcessor, SphinxImageProcessorPil
from modeling_sphinx.processing.image_processing_sphinx import pillow_resize

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "images"
CLIP_STD = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)


def torchvision_resize(images, size, resample):
    return tvF.resize(images, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)


def resizing_with(resize, size) -> SphinxImageProcessor:
    """The default processor with `resize(images, size, resample)` in place of its `resize_images`."""

    class Processor(SphinxImageProcessor):
        def resize_images(self, images, size, resample):
            return resize(images, size, resample)

    return Processor(size=size)


def timed(processor, images, repeats, device=None):
    kwargs = {"device": device} if device else {}
    times, pixels = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        pixels = torch.as_tensor(processor(images, return_tensors="pt", **kwargs)["pixel_values"])
        if pixels.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), pixels.cpu()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", default=str(FIXTURES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None, help="e.g. cuda: preprocess on that device")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    photos = [Image.open(p).convert("RGB") for p in files]
    images = [photos[i % len(photos)] for i in range(args.batch)]
    print(f"{len(images)} images from {args.images}: " + ", ".join(f"{p.width}x{p.height}" for p in photos))
    for side in (448, 1024):
        size = {"height": side, "width": side}
        pil_time, pil_pixels = timed(SphinxImageProcessorPil(size=size), images, args.repeats)
        rows = [("Pillow (SphinxImageProcessorPil)", pil_time, pil_pixels)]
        default = SphinxImageProcessor(size=size)
        device = args.device
        rows.append(("default (SphinxImageProcessor)", *timed(default, images, args.repeats, device)))
        port = timed(resizing_with(pillow_resize, size), images, args.repeats, device)
        rows.append((f"torch port (pillow_resize, {device or 'cpu'})", *port))
        torchvision = timed(resizing_with(torchvision_resize, size), images, args.repeats, device)
        rows.append(("torchvision resize", *torchvision))
        for name, seconds, pixels in rows:
            levels = ((pixels - pil_pixels) * CLIP_STD * 255).abs().max().item()  # back to 8-bit levels
            print(
                f"{side} px  {name:34s} {len(images) / seconds:7.1f} images/s  "
                f"({seconds / pil_time:.2f}x Pillow's time)  max diff vs Pillow {levels:.2f} levels"
                + ("  (bit-exact)" if torch.equal(pixels, pil_pixels) else "")
            )


if __name__ == "__main__":
    main()
