"""Fixtures the tests share: tiny model folders, the quick demo, and a small world of annotated images."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

import modeling_sphinx  # noqa: E402,F401  (registers the Auto classes)
from modeling_sphinx.folder.create import init_model  # noqa: E402

from .helpers import write_jsonl  # noqa: E402

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    without_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(without_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A factory of tiny random model folders, one per variant for the whole session."""
    made = {}

    def make(variant: str = "sphinx-1k") -> Path:
        if variant not in made:
            made[variant] = init_model(variant, tmp_path_factory.mktemp("models") / variant, tiny=True)
        return made[variant]

    return make


@pytest.fixture(scope="session")
def trio(tmp_path_factory):
    """Three tiny SPHINX checkpoints of one architecture (different seeds), bfloat16 like real releases."""
    root = tmp_path_factory.mktemp("mix")
    folders = []
    for seed in (1, 2, 3):
        folder = init_model("sphinx", root / f"seed{seed}", tiny=True, seed=seed)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        sharded = root / f"sharded{seed}"
        model.to(torch.bfloat16).save_pretrained(sharded, max_shard_size="200KB")
        for extra in folder.iterdir():
            if extra.suffix in (".json", ".jinja", ".py") and not (sharded / extra.name).exists():
                (sharded / extra.name).write_bytes(extra.read_bytes())
        folders.append(sharded)
    return folders


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`sphinx-mllm demo --quick` run once for the session, in its own process as a user runs it:
    `(output folder, what it printed on stdout, what it printed on stderr)`."""
    out = tmp_path_factory.mktemp("quick-demo") / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "modeling_sphinx.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout, run.stderr


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A few generated images and one annotation file per supported format."""
    root = tmp_path_factory.mktemp("world")
    images = root / "images"
    images.mkdir()
    colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
    for index, (name, colour) in enumerate(colours.items()):
        image = Image.new("RGB", (200, 100), (235, 235, 235))
        ImageDraw.Draw(image).rectangle([20 + 40 * index, 10, 120 + 40 * index, 60], fill=colour)
        image.save(images / f"{name}.png")
    write_jsonl(
        root / "vqa.jsonl",
        [{"image": f"{n}.png", "question": "What colour is the box?", "answer": n} for n in colours],
    )
    write_jsonl(
        root / "refcoco.jsonl",
        [{"image": "red.png", "expression": "the red box", "box": [20, 10, 120, 60], "id": "r1"}]
        + [{"image": "blue.png", "sentences": ["a blue box", "the box"], "bbox": [60, 10, 100, 50], "id": "b1"}],
    )
    coco = {
        "images": [{"id": 1, "file_name": "red.png", "width": 200, "height": 100}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [20, 10, 100, 50], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [140, 50, 60, 50], "iscrowd": 0},
            {"id": 13, "image_id": 1, "category_id": 2, "bbox": [0, 0, 200, 100], "iscrowd": 1},
        ],
    }
    (root / "instances.json").write_text(json.dumps(coco))
    keypoints = [0] * 51
    keypoints[0:3] = [100, 20, 2]  # nose
    keypoints[15:18] = [80, 40, 1]  # left shoulder
    people = {
        "images": coco["images"],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {
                "id": 20,
                "image_id": 1,
                "category_id": 1,
                "bbox": [20, 10, 100, 50],
                "keypoints": keypoints,
                "num_keypoints": 2,
            }
        ],
    }
    (root / "keypoints.json").write_text(json.dumps(people))
    write_jsonl(root / "ocr.jsonl", [{"image": "green.png", "texts": [{"text": "EXIT", "box": [100, 10, 200, 60]}]}])
    write_jsonl(root / "charts.jsonl", [{"image": "blue.png", "table": "| year | value |\n| 2020 | 3 |"}])
    conversations = [
        {
            "id": "c1",
            "image": "green.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "A green box."},
                {"from": "human", "value": "Where is it?"},
                {"from": "gpt", "value": "On the right."},
            ],
        }
    ]
    (root / "llava.json").write_text(json.dumps(conversations))
    mixture = {
        "seed": 0,
        "sources": [
            {"task": "vqa", "path": "vqa.jsonl", "image_root": "images", "weight": 2},
            {"task": "referring_expression", "path": "refcoco.jsonl", "image_root": "images"},
            {"task": "region_caption", "path": "refcoco.jsonl", "image_root": "images"},
            {"task": "detection", "path": "instances.json", "image_root": "images"},
            {"task": "grounded_caption", "path": "instances.json", "image_root": "images"},
            {"task": "keypoints", "path": "keypoints.json", "image_root": "images"},
            {"task": "text_detection", "path": "ocr.jsonl", "image_root": "images"},
            {"task": "chart_to_table", "path": "charts.jsonl", "image_root": "images"},
            {"task": "conversations", "path": "llava.json", "image_root": "images"},
        ],
    }
    (root / "mixture.yaml").write_text(yaml.safe_dump(mixture))
    return root
