"""`sphinx-mllm serve` under concurrent clients: latency, throughput and the server's memory.

    .venv/bin/python benchmarks/bench_serve_load.py MODEL [--clients 16] [--requests 12]

Starts `sphinx-mllm serve MODEL` on a free loopback port and runs `--clients` `gradio_client` clients at once:
two requests each first, after which it reads the server's RSS (the queue's threads and buffers exist by then),
then `--requests` each. Each client cycles
through a grounding question with a short answer, the same with a long answer budget, an upload that is not an
image and a truncated PNG. It prints p50 / p95 latency, requests per second and the RSS after the first requests
and after all of them. The baseline is the same requests sent alone: every good answer must equal it, and every bad
upload must get its named error. `tests/test_serve_load.py` runs the same driver (`drive`) and asserts on it.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ERRORS = {"not an image": "is not an image", "truncated": "is damaged"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(model: Path, port: int, *options: str, output=subprocess.DEVNULL) -> subprocess.Popen:
    """`sphinx-mllm serve MODEL --port PORT OPTIONS` in its own process (its console to `output`), once it answers."""
    import httpx

    command = [sys.executable, "-m", "sphinx_mllm_cli", "serve", str(model), "--port", str(port), *options]
    server = subprocess.Popen(
        command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"sphinx-mllm serve exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("sphinx-mllm serve did not answer within 180 s")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cases(image: Path, question: str, scratch: Path) -> list[tuple[str, Path, int]]:
    """(name, upload, max new tokens): two good requests and the two bad uploads."""
    not_an_image = scratch / "notes.png"
    not_an_image.write_text("these are notes, not pixels\n")
    truncated = scratch / "truncated.png"
    truncated.write_bytes(image.read_bytes()[:2000])
    return [("short", image, 24), ("long", image, 96), ("not an image", not_an_image, 24),
            ("truncated", truncated, 24)]  # fmt: skip


def ask(client, case, question):
    """`(name, answer text or error message, seconds)` of one request."""
    from gradio_client import handle_file

    name, upload, tokens = case
    started = time.perf_counter()
    try:
        result = client.predict(handle_file(str(upload)), question, tokens, False, 0.7, 0.9, api_name="/answer")
        outcome = result["text"]
    except Exception as error:  # gradio_client raises its AppError with the server's message
        outcome = f"error: {error}"
    return name, outcome, time.perf_counter() - started


def drive(url: str, question: str, plan: list, clients: int, requests: int, timeout: float = 600):
    """`clients` clients at once, each sending `requests` requests cycling through `plan`; a TimeoutError if they
    have not all finished within `timeout` seconds (a hung request)."""
    from gradio_client import Client

    def client_run(index):
        client = Client(url, verbose=False, analytics_enabled=False)
        return [ask(client, plan[(index + k) % len(plan)], question) for k in range(requests)]

    with ThreadPoolExecutor(clients) as pool:
        return [record for records in pool.map(client_run, range(clients), timeout=timeout) for record in records]


def check(records, alone: dict[str, str]) -> list[str]:
    """What went wrong: a good answer unlike its answer alone, a bad upload without its named error."""
    problems = []
    for name, outcome, _ in records:
        if name in ERRORS and ERRORS[name] not in outcome:
            problems.append(f"{name}: {outcome[:200]}")
        elif name not in ERRORS and outcome != alone[name]:
            problems.append(f"{name}: {outcome[:200]!r} differs from {alone[name][:200]!r}")
    return problems


def run(model: Path, image: Path, question: str, clients: int, requests: int) -> dict:
    from gradio_client import Client

    port = free_port()
    server = start(model, port)
    url = f"http://127.0.0.1:{port}/"
    try:
        with tempfile.TemporaryDirectory() as scratch:
            plan = cases(image, question, Path(scratch))
            client = Client(url, verbose=False, analytics_enabled=False)
            alone = {case[0]: ask(client, case, question)[1] for case in plan}
            warm = drive(url, question, plan, clients, 2)
            rss_first = rss_mib(server.pid)
            started = time.perf_counter()
            records = drive(url, question, plan, clients, requests)
            wall = time.perf_counter() - started
            rss_last = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    latencies = sorted(seconds for _, _, seconds in records)
    return {
        "requests": len(warm) + len(records),
        "concurrent_requests": len(records),
        "clients": clients,
        "requests_per_s": len(records) / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "rss_after_first_mib": rss_first,
        "rss_after_all_mib": rss_last,
        "problems": check(warm + records, alone),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a model folder, e.g. runs/demo/best")
    parser.add_argument("--image", type=Path, help="an image to ask about (default: the demo's first held-out one)")
    parser.add_argument("--expression", default="the red circle")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=12)
    args = parser.parse_args()
    from modeling_sphinx.processing.tasks_sphinx import TASK_INSTRUCTIONS

    image = args.image or next(args.model.parent.glob("data/real-1???????/images/*.png"))
    question = TASK_INSTRUCTIONS["referring_expression"].format(expression=args.expression)
    print(json.dumps(run(args.model, image, question, args.clients, args.requests), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
