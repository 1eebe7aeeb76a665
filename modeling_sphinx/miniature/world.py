"""The miniature world of `sphinx-mllm demo`: generated scenes in two visual domains, their captions, and the
geometry of the miniature SPHINX that reads them.

A scene is one coloured shape (or two of distinct kinds and colours), 55-80 px, and a 14-px dot, on a 224 x 168
image in a "real-like" domain (lit, noisy, cluttered, jittered colours, blurred) or a "synthetic" one (flat,
clean). Everything follows from a seed and a domain, so no data files exist.
"""

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 80, 220), "yellow": (230, 195, 35)}
SHAPES = ("circle", "square", "triangle")
DOMAINS = ("real", "synthetic")
WIDTH, HEIGHT = 224, 168  # not square, so the padding to a square is part of every box
# The small dot's side: half a 28-px patch's side in a sub-image view (the input at full size), a quarter in the
# global view (halved); why 14 and not 7 is in docs/decisions.md
DOT = 14


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: list[int], colour: tuple[int, int, int]):
    x1, y1, x2, y2 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=colour)


def render(seed: int, domain: str) -> tuple[Image.Image, list[dict], dict]:
    """One scene: 1 shape (or 2 of distinct kinds and colours), 55-80 px, and a `DOT`-px dot; `(image, shapes, dot)`."""
    rng = random.Random(f"{domain}-{seed}")
    if domain == "real":
        base = np.array([rng.randint(120, 200) for _ in range(3)], dtype=np.float32)
        light = np.linspace(0.75, 1.15, WIDTH)[None, :, None] * np.linspace(1.1, 0.8, HEIGHT)[:, None, None]
        noise = np.random.default_rng(seed).normal(0, 14, (HEIGHT, WIDTH, 3))
        image = Image.fromarray(np.clip(base * light + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):  # clutter
            points = [(rng.randrange(WIDTH), rng.randrange(HEIGHT)) for _ in range(2)]
            draw.line(points, fill=tuple(rng.randint(60, 230) for _ in range(3)), width=rng.randint(1, 3))
    else:
        image = Image.new("RGB", (WIDTH, HEIGHT), (238, 238, 238))
        draw = ImageDraw.Draw(image)
    kinds = rng.sample(SHAPES, 1 if rng.random() < 0.6 else 2)
    colours = rng.sample(list(COLOURS), len(kinds) + 1)
    shapes, taken = [], []
    for kind, colour in zip(kinds, colours, strict=False):
        for _ in range(50):
            side = rng.randint(55, 80)
            x, y = rng.randint(4, WIDTH - side - 4), rng.randint(4, HEIGHT - side - 4)
            box = [x, y, x + side, y + side]
            if all(box[2] < t[0] - 4 or box[0] > t[2] + 4 or box[3] < t[1] - 4 or box[1] > t[3] + 4 for t in taken):
                break
        taken.append(box)
        fill = COLOURS[colour]
        if domain == "real":
            fill = tuple(min(255, max(0, c + rng.randint(-18, 18))) for c in fill)
        _shape(draw, kind, box, fill)
        shapes.append({"kind": kind, "colour": colour, "box": box})
    dot_colour = colours[len(kinds)]
    for _ in range(50):
        x, y = rng.randint(4, WIDTH - DOT - 4), rng.randint(4, HEIGHT - DOT - 4)
        if all(x + DOT < t[0] or x > t[2] or y + DOT < t[1] or y > t[3] for t in taken):
            break
    draw.ellipse([x, y, x + DOT, y + DOT], fill=COLOURS[dot_colour])
    if domain == "real":
        image = image.filter(ImageFilter.GaussianBlur(0.6))
    return image, shapes, {"colour": dot_colour, "box": [x, y, x + DOT, y + DOT]}


MINIATURE_VOCABULARY = 768  # SentencePiece pieces of the miniature's tokenizer
_ENCODER = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 112, "patch_size": 28}
# `SphinxConfig.from_variant("sphinx-1k", tiny=True, **MINIATURE)`: a global view and 2 x 2 sub-image views
# (224-px input, 112-px views in 28-px patches, no Q-Former: 5 x 19 = 95 visual tokens)
MINIATURE = {
    "image_size": 224,
    "view_size": 112,
    "patch_size": 28,
    "convnext_view_size": 128,  # ConvNeXt's stride-32 map of a 128-px view is the 4 x 4 patch grid
    "qformer_config": None,
    "clip_config": {"architecture": "vit_large_patch14_clip_224", "model_args": _ENCODER},
    "dinov2_config": {"architecture": "vit_giant_patch14_dinov2", "model_args": {**_ENCODER, "embed_dim": 24}},
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}


def place(box: list[float]) -> str:
    """Where a box's centre lies on a 3 x 3 grid of the image: "top left", "centre", "bottom", ..."""
    column = min(2, int(3 * (box[0] + box[2]) / 2 / WIDTH))
    row = min(2, int(3 * (box[1] + box[3]) / 2 / HEIGHT))
    vertical, horizontal = ("top", "", "bottom")[row], ("left", "", "right")[column]
    return f"{vertical} {horizontal}".strip() or "centre"


def caption(shapes: list[dict], dot: dict, domain: str) -> str:
    """A description of the scene in words, as an image-text corpus would have it."""
    things = [f"a {s['colour']} {s['kind']} at the {place(s['box'])}" for s in shapes]
    things.append(f"a small {dot['colour']} dot at the {place(dot['box'])}")
    setting = "a photo of" if domain == "real" else "a flat drawing of"
    return f"{setting} {', '.join(things[:-1])} and {things[-1]}"
