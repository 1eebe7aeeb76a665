"""What the tests share besides fixtures: the repository's paths, and small builders of inputs."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
IMAGES = FIXTURES / "images"
PARITY = FIXTURES / "parity"


def image_message(text: str, image=None, path=None) -> list[dict]:
    """One user turn with an image (a PIL image or a file's path) before the text."""
    block = {"type": "image", "image": image} if image is not None else {"type": "image", "path": str(path)}
    return [{"role": "user", "content": [block, {"type": "text", "text": text}]}]


def write_jsonl(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def train_args(tiny, world, out, *extra):
    """`sphinx-mllm train` with the smoke preset on a tiny folder and the test world's mixture."""
    return [
        "train",
        str(REPO / "recipes" / "sft" / "smoke.yaml"),
        "--model_name_or_path",
        str(tiny),
        "--mixture",
        str(world / "mixture.yaml"),
        "--output_dir",
        str(out),
        *extra,
    ]
