"""A SPHINX folder served by vLLM's Transformers backend against `generate` in one process.

    .venv/bin/python benchmarks/bench_serving.py MODEL [--requests 64] [--concurrency 16] [--max-tokens 32]

Starts `vllm serve MODEL --model-impl transformers --trust-remote-code` on a free port, sends `--requests`
grounding questions about generated scenes (`modeling_sphinx.miniature.world`), `--concurrency` at a time, through the
OpenAI client with `modeling_sphinx.serving.client.chat_request` (greedy, stop at the separator, `<image>` banned), then
answers the same questions with `generate` in this process, one at a time, as the baseline. It prints requests
per second both ways and their ratio, latency percentiles, and how many served answers equal `generate`'s.

It needs a CUDA GPU, a `vllm` executable (`--vllm PATH`, default the one on PATH: vLLM pins its own transformers,
`<5.21` for 0.33, so it lives in a virtual environment of its own, where the folder's remote code runs; this
script, the client and the baseline run in the package's environment) and `openai`; without any of them it says
which is missing and exits 0.
"""

import argparse
import importlib.util
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def missing(vllm: str | None) -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (vLLM's Transformers backend serves on GPUs)"
    if vllm is None or not Path(vllm).is_file():
        return f"no vllm executable ({vllm or 'none on PATH'}; install vLLM in its own venv and pass --vllm PATH)"
    if importlib.util.find_spec("openai") is None:
        return "openai is not installed (pip install -e '.[client]')"
    return None


def questions(count: int):
    from modeling_sphinx.miniature.world import render
    from modeling_sphinx.processing.tasks_sphinx import TASK_INSTRUCTIONS

    for seed in range(50_000_000, 50_000_000 + count):
        image, shapes, _ = render(seed, "real")
        target = shapes[0]
        expression = f"the {target['colour']} {target['kind']}"
        yield image, TASK_INSTRUCTIONS["referring_expression"].format(expression=expression)


def start_server(vllm: str, model: str, port: int, log) -> subprocess.Popen:
    command = [vllm, "serve", model, "--model-impl", "transformers", "--trust-remote-code",
               "--port", str(port), "--dtype", "bfloat16"]  # fmt: skip
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.returncode}; its log: {log.name}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return server
        except OSError:
            time.sleep(2)
    server.terminate()
    raise RuntimeError(f"vllm serve did not answer within 15 minutes; its log: {log.name}")


def served_answers(model, port, asked, processor, concurrency, max_tokens):
    from openai import OpenAI

    from modeling_sphinx.serving.client import chat_request

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

    def ask(item):
        started = time.perf_counter()
        request = chat_request(model, item[0], item[1], processor, max_tokens=max_tokens)
        reply = client.chat.completions.create(**request).choices[0].message.content
        return reply, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, asked))
    return [r for r, _ in results], [t for _, t in results], time.perf_counter() - started


def generated_answers(model_dir, asked, max_tokens):
    import torch

    from modeling_sphinx.inference import generate_answers, load_pretrained, user_turn

    processor, model = load_pretrained(model_dir, dtype="bfloat16", device_map="cuda")
    answers, latencies = [], []
    started = time.perf_counter()
    for image, question in asked:
        one = time.perf_counter()
        conversation = [[user_turn(question, image)]]
        answers += generate_answers(model, processor, conversation, max_new_tokens=max_tokens, do_sample=False)
        torch.cuda.synchronize()
        latencies.append(time.perf_counter() - one)
    return answers, latencies, time.perf_counter() - started


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"p50_s": statistics.median(ordered), "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a SPHINX model folder")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--vllm", default=shutil.which("vllm"), help="the vllm executable (its own venv)")
    parser.add_argument("--log", default="vllm_serve.log")
    args = parser.parse_args()
    reason = missing(args.vllm)
    if reason:
        print(f"bench_serving: skipped: {reason}")
        return 0
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    asked = list(questions(args.requests))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(args.log, "w") as log:
        server = start_server(args.vllm, args.model, port, log)
        try:
            served, served_latency, served_wall = served_answers(
                args.model, port, asked, processor, args.concurrency, args.max_tokens
            )
        finally:
            server.terminate()
            server.wait(60)
    generated, generated_latency, generated_wall = generated_answers(args.model, asked, args.max_tokens)
    report = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "served_requests_per_s": args.requests / served_wall,
        "generate_requests_per_s": args.requests / generated_wall,
        "throughput_ratio": generated_wall / served_wall,
        "served_latency": percentiles(served_latency),
        "generate_latency": percentiles(generated_latency),
        "answers_equal": sum(s.strip() == g.strip() for s, g in zip(served, generated, strict=True)),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
