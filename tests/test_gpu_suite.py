"""`benchmarks/gpu_suite.py`: its CPU dry run, so that every section still runs between GPU runs."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from .helpers import REPO
from .test_hub_kernels import LOUD, MARKER

pytestmark = pytest.mark.slow

SUITE = REPO / "benchmarks" / "gpu_suite.py"


def _suite(*args: str, cwd) -> subprocess.CompletedProcess:
    """The suite offline, with every Hub kernel fetcher made to fail loudly (`tests/loud_kernels`), in it and in
    the commands it runs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(LOUD), os.environ.get("PYTHONPATH", "")])
    env.pop("USE_HUB_KERNELS", None)
    return subprocess.run(
        [sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=1200, cwd=cwd, env=env
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    run = _suite("--device", "cpu", "--tiny", "--out", str(out), cwd=out)
    return run, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_every_section_runs_on_the_cpu(dry_run):
    run, report, _ = dry_run
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert {name: section["status"] for name, section in report["sections"].items()} == {
        name: "ok" for name in ("card", "numerics", "inference", "lora", "qlora", "full_finetune", "commands")
    }
    assert report["tiny"] and report["environment"]["versions"]["torch"]
    assert MARKER not in run.stdout + run.stderr and "kernel" not in run.stderr.lower()


def test_the_dry_run_measures_what_the_gpu_run_reports(dry_run):
    _, report, _ = dry_run
    results = report["results"]
    assert results["card"]["copy_tb_per_s"] > 0 and results["card"]["bf16_matmul_tflop_per_s"] > 0
    for name, fixture in results["numerics"]["fixtures"].items():  # on the CPU the parity bar itself holds
        assert fixture["float32_max_abs_diff"] <= 1e-4, name
        assert 0 < fixture["bf16_relative_l2"] < 0.1 and fixture["greedy_tokens"] == 16, name
    inference = results["inference"]
    assert inference["prompt_tokens"] > 1455  # SPHINX-1k's visual tokens, then the question
    for key in ("prefill_s", "encoders_s", "eager_ms_per_token", "llama_eager_ms_per_token", "compiled_ms_per_token",
                "llama_compiled_ms_per_token", "hbm_bound_ms_per_token", "batch8_tokens_per_s"):  # fmt: skip
        assert inference[key] > 0, key
    assert 0 < inference["encoder_share_of_prefill"] < 1
    for name in ("lora", "qlora", "full_finetune"):
        tuned = results[name]
        assert tuned["steps"] == 2 and tuned["batch"] == 4, name
        assert tuned["tokens_per_step"] > tuned["batch"] * tuned["visual_tokens_per_sample"] >= 4 * 1000, name
        assert tuned["tokens_per_s"] > 0 and math.isfinite(tuned["last_loss"]), name
    commands = results["commands"]
    assert set(commands) == {"init", "train", "chat", "chat --load-in-4bit", "eval", "serve", "all_ok"}
    # each command finished and printed no line about kernels, with the fetchers failing loudly
    assert commands["all_ok"], {name: c for name, c in commands.items() if name != "all_ok" and not c["ok"]}


def test_the_table_states_the_targets_without_judging_a_tiny_run(dry_run):
    _, _, table = dry_run
    assert table.startswith("# GPU suite: ") and "(tiny dry run)" in table.splitlines()[0]
    targets = [line for line in table.splitlines() if line.startswith("| compiled decode / HBM bound")]
    assert len(targets) == 1 and targets[0].endswith("| >= 0.5 | not judged (tiny) |")


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path):
    run = _suite("--device", "cpu", "--tiny", "--out", str(tmp_path), "--sections", "numerics,card",
                 "--parity", str(tmp_path / "missing"), cwd=tmp_path)  # fmt: skip
    assert run.returncode == 1
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert sections["numerics"]["status"] == "failed" and "no parity fixtures in" in sections["numerics"]["error"]
    assert sections["card"]["status"] == "ok"
    assert "failed: numerics" in run.stdout


def test_judging_a_full_size_report():
    sys.path.insert(0, str(SUITE.parent))
    import gpu_suite

    report = {
        "tiny": False,
        "environment": {"date": "2026-12-04", "device": "GPU", "cuda": "13.0", "python": "3.12", "versions": {}},
        "sections": {"inference": {"status": "ok", "seconds": 1.0}},
        "results": {"inference": {"eager_vs_llama": 0.99, "encoder_share_of_prefill": 0.47}},
    }
    lines = gpu_suite.markdown(report).splitlines()
    assert "| eager decode / plain LLaMA eager | 0.99 | >= 0.95 | met |" in lines
    assert "| encoders / one-image prefill | 0.47 | <= 0.25 | not met |" in lines
    assert "| LoRA 13B tokens/s | — | >= 4,500 | not measured |" in lines


def test_decode_time_is_the_median_decode_step_without_the_prefill(monkeypatch):
    sys.path.insert(0, str(SUITE.parent))
    import gpu_suite

    now = [0.0]
    monkeypatch.setattr(gpu_suite.time, "perf_counter", lambda: now[0])

    class Model:  # what `generate` does with a streamer: the prompt, the prefill's token, then one per step
        calls = 0

        def generate(self, max_new_tokens, streamer, **kwargs):
            Model.calls += 1
            streamer.put("prompt")
            now[0] += 5.0  # the prefill
            streamer.put("first token")
            for step in range(max_new_tokens - 1):
                now[0] += 0.5 if step == 1 and Model.calls == 2 else 0.1
                streamer.put("token")

    ctx = SimpleNamespace(scale=SimpleNamespace(decode_tokens=4, repeats=2), sync=lambda: None)
    assert gpu_suite.decode_seconds_per_token(ctx, Model(), {}) == pytest.approx(0.1)
    assert Model.calls == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the default run is the whole suite")
def test_without_a_gpu_the_default_run_says_so(tmp_path):
    run = _suite("--out", str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("skipped: no CUDA GPU")
    unknown = _suite("--sections", "card,nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown section 'nope'" in unknown.stderr


@pytest.mark.gpu
def test_on_a_gpu_the_ceilings_and_the_parity_fixtures_are_measured(tmp_path):
    run = _suite("--sections", "card,numerics", "--out", str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results["card"]["copy_tb_per_s"] > 0.1 and results["card"]["bf16_matmul_tflop_per_s"] > 1
    for name, fixture in results["numerics"]["fixtures"].items():
        assert fixture["float32_max_abs_diff"] <= 1e-4 or name == "llama_ens5_light", name  # see docs/gpu.md
