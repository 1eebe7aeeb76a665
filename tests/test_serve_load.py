"""The web app under concurrent load: 16 `gradio_client` clients against `sphinx-mllm serve` on
loopback, good questions, long answers and bad uploads mixed; nothing fails, hangs, changes or leaks."""

import importlib.util
import json
from pathlib import Path

import pytest

from modeling_sphinx.cli import main
from modeling_sphinx.processing.tasks_sphinx import TASK_INSTRUCTIONS

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve_load.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sixteen_clients_get_what_one_gets_and_the_server_does_not_grow(quick_demo):
    split = next((quick_demo[0] / "data").glob("real-1???????"))
    row = json.loads((split / "grounding.jsonl").read_text().splitlines()[0])
    question = TASK_INSTRUCTIONS["referring_expression"].format(expression=row["expression"])
    found = _bench().run(quick_demo[0] / "best", split / row["image"], question, clients=16, requests=12)
    assert found["problems"] == [], found["problems"][:5]
    assert found["requests"] == 16 * 2 + 16 * 12 and found["concurrent_requests"] == 16 * 12
    assert found["rss_after_all_mib"] <= 1.10 * found["rss_after_first_mib"], found  # no leak


def test_serve_refuses_an_open_network_address_without_a_login(tmp_path, capsys):
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        assert main(["serve", str(tmp_path / "no-model"), "--host", host]) == 2
        error = capsys.readouterr().err
        assert f"--host {host} lets anyone who can reach this machine use the model" in error
        assert "--auth USER:PASSWORD" in error and "--public" in error
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--auth", "nopassword"]) == 2
    assert "--auth is USER:PASSWORD" in capsys.readouterr().err
