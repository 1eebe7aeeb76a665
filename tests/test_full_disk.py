"""A filesystem that fills up: `convert`, `mix` and a training save end with one line naming the path
and the space needed, exit 2, leave no partial output and do not touch their inputs.

The commands run in a child process whose files may not grow past a limit (`RLIMIT_FSIZE`, with `SIGXFSZ`
ignored, so a write past it fails with `EFBIG` as one into a full disk fails with `ENOSPC`)."""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import PARITY, train_args

pytestmark = pytest.mark.slow

LIMIT = 200_000  # bytes a file may reach: every model file of these tiny models is larger


def _limited():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "modeling_sphinx.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=cwd, preexec_fn=_limited)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _one_line_error(run: subprocess.CompletedProcess, command: str, progress: bool = False) -> str:
    """The error line; the only line on stderr, or after the progress bars only (`progress`)."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr and (progress or len(lines) == 1), run.stderr[-3000:]
    errors = [line for line in lines if line.startswith(f"sphinx-mllm {command}: error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    return errors[0]


def test_mix_into_a_full_disk(tiny_model_dir, tmp_path):
    import yaml

    first = tiny_model_dir("sphinx-1k")
    before = _digest(first)
    recipe = {"merge_method": "linear", "base_model": str(first),
              "models": [{"model": str(first), "parameters": {"weight": 0.5}},
                         {"model": str(first), "parameters": {"weight": 0.5}}]}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = _run(["mix", "recipe.yaml", "out"], tmp_path)
    line = _one_line_error(run, "mix")
    assert "out: the filesystem is full after" in line and "it needs about 1.1 MiB" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # no output, no staging folder
    assert _digest(first) == before


def test_convert_into_a_full_disk(tmp_path):
    fixture = PARITY / "llama_ens5_light"
    manifest = json.loads((fixture / "manifest.json").read_text())
    (tmp_path / "sizes.json").write_text(json.dumps(manifest["size_changes_vs_real_model"]))
    before = _digest(fixture / "checkpoint")
    run = _run(["convert", str(fixture / "checkpoint"), "hf", "--encoder-sizes", "sizes.json"], tmp_path)
    line = _one_line_error(run, "convert")
    assert "hf: the filesystem is full after" in line and "it needs about" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sizes.json"]
    assert _digest(fixture / "checkpoint") == before


def test_a_training_checkpoint_into_a_full_disk(world, tiny_model_dir, tmp_path):
    model = tiny_model_dir("sphinx")
    before = _digest(model)
    run = _run(train_args(model, world, tmp_path / "run"), tmp_path)
    line = _one_line_error(run, "train", progress=True)
    assert f"{tmp_path / 'run' / 'checkpoint-4'}: the filesystem is full; a checkpoint needs about" in line
    assert "resume from the last complete one" in line
    assert not (tmp_path / "run" / "checkpoint-4").exists() and not (tmp_path / "run" / "model").exists()
    assert _digest(model) == before


@pytest.mark.parametrize("free", [0])
def test_a_disk_without_the_space_is_refused_before_writing(tiny_model_dir, tmp_path, monkeypatch, free):
    import shutil

    from modeling_sphinx.folder.atomic import atomic_output_dir

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
    refused = pytest.raises(ValueError, match=r"out: not enough space: it needs about 1\.0 MiB and .* has 0 B free")
    with refused, atomic_output_dir(tmp_path / "out", needed_bytes=2**20):
        raise AssertionError("nothing is written")
    assert not list(tmp_path.iterdir())
