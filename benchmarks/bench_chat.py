"""Latency of a chat's later turns with the KV cache kept (`Chat`) against re-encoding the whole conversation.

    .venv/bin/python benchmarks/bench_chat.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 5]

A SPHINX-1k-geometry model (1455 visual tokens, tiny encoders, the LLaMA of `bench_inference.py`: 512 wide,
6 layers) answers three questions about one photo, greedy, 16 new tokens each. The baseline is the same `Chat`
with `reuse_cache=False`: every turn encodes the five views and runs the LLM over the whole conversation again,
which is what `sphinx-mllm chat` and the web app did before. Each turn's median over `--repeats` conversations is
reported, with the answers checked to be identical both ways.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_inference import TEXT  # this folder is on the path when the script runs
from PIL import Image

from modeling_sphinx.folder.create import init_model
from modeling_sphinx.inference import Chat, load_pretrained

QUESTIONS = ("What is shown in this image?", "What colour is it?", "Where is it in the image?")
IMAGE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "images" / "chelsea.png"


def conversation(model, processor, image, reuse_cache: bool, new_tokens: int, device) -> tuple[list, list]:
    chat = Chat(model, processor, image, reuse_cache=reuse_cache)
    answers, seconds = [], []
    for question in QUESTIONS:
        start = time.perf_counter()
        answers.append(chat.ask(question, max_new_tokens=new_tokens, min_new_tokens=new_tokens))
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return answers, seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = {k: v for k, v in TEXT.items() if k != "vocab_size"}
    with tempfile.TemporaryDirectory() as scratch:
        folder = init_model("sphinx-1k", Path(scratch) / "model", tiny=True, text_config=text)
        processor, model = load_pretrained(str(folder), dtype=args.dtype)
    model.to(args.device)
    image = Image.open(IMAGE).convert("RGB")
    conversation(model, processor, image, True, 2, args.device)  # warm-up
    turns, answers = {}, {}
    for reuse in (False, True):
        runs = [
            conversation(model, processor, image, reuse, args.new_tokens, args.device) for _ in range(args.repeats)
        ]
        turns[reuse] = [statistics.median(run[1][turn] for run in runs) for turn in range(len(QUESTIONS))]
        answers[reuse] = runs[0][0]
    assert answers[True] == answers[False], "the kept cache changed the answers"
    print(f"{args.device}, {args.dtype}, {model.config.num_image_tokens} visual tokens, {args.new_tokens} new tokens")
    print("| turn | re-encoding (s) | kept cache (s) | speed-up |")
    print("|---|---|---|---|")
    for turn in range(len(QUESTIONS)):
        before, after = turns[False][turn], turns[True][turn]
        print(f"| {turn + 1} | {before:.3f} | {after:.3f} | {before / after:.2f}x |")


if __name__ == "__main__":
    main()
