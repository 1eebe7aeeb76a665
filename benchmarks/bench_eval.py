"""Evaluation throughput of `modeling_sphinx.evaluation.runner.evaluate` at batch sizes 1, 4 and 16, same run.

    .venv/bin/python benchmarks/bench_eval.py [--samples 32] [--max-new-tokens 8] [--device cpu]

A tiny random SPHINX-1k (1455 visual tokens per image, written by `init --tiny`) answers VQA questions about
generated images of different sizes; samples/s is measured end to end (image loading, preprocessing,
batched greedy generation with left padding, parsing, writing predictions). Batched answers must be
identical to one-at-a-time answers; the script checks that.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_sphinx.evaluation.runner import evaluate
from modeling_sphinx.folder.create import init_model


def make_rows(root: Path, samples: int) -> Path:
    rows = []
    for index in range(samples):
        width, height = 160 + 24 * (index % 5), 120 + 16 * (index % 3)
        image = Image.new("RGB", (width, height), (235, 235, 235))
        ImageDraw.Draw(image).rectangle([10 + index % 7, 10, 80, 60 + index % 11], fill=(40 * (index % 6), 90, 200))
        image.save(root / f"{index}.png")
        questions = ("What colour is the box?", "How many boxes are there?", "Is the box on the left?")
        rows.append({"id": index, "image": f"{index}.png", "question": questions[index % 3], "answer": "blue"})
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="sphinx-eval-bench-"))
    data = make_rows(root, args.samples)
    folder = init_model("sphinx-1k", root / "model", tiny=True)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).to(args.device).eval()
    evaluate(model, processor, "vqa", data, root / "warm-up", batch_size=4, limit=4, progress=False)
    answers = {}
    for batch_size in (1, 4, 16):
        out = root / f"batch{batch_size}"
        start = time.perf_counter()
        evaluate(model, processor, "vqa", data, out, batch_size=batch_size,
                 max_new_tokens=args.max_new_tokens, progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        answers[batch_size] = [
            json.loads(line)["answer"] for line in (out / "predictions.jsonl").read_text().splitlines()
        ]
        print(f"batch {batch_size:2d}: {args.samples / seconds:6.2f} samples/s ({seconds:.1f} s for {args.samples})")
    same = answers[1] == answers[4] == answers[16]
    print(f"batched greedy answers identical to one at a time: {same}")
    if not same:
        raise SystemExit("batched answers differ from one-at-a-time answers")


if __name__ == "__main__":
    main()
