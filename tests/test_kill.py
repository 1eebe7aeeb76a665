"""SIGKILL at chosen points: `mix`, `convert`, `train` (between steps and while a checkpoint is being
written), `eval` and `demo` leave no output or checkpoint that looks complete but is not; the same command run
again completes, and resuming gives what an uninterrupted run gives.

`tests/killer/sitecustomize.py` kills the child process at the `count`-th call of a named function. Each command
is killed at its points in turn, every re-run dying at the next point, so each test also shows that recovery
survives being interrupted itself, and the suite starts a third fewer processes than one test per point would."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .helpers import PARITY, train_args

pytestmark = pytest.mark.slow

KILLER = Path(__file__).resolve().parent / "killer"


def _run(args: list[str], cwd: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if kill is not None:
        env.update(SPHINX_KILL=kill, PYTHONPATH=os.pathsep.join([str(KILLER), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "modeling_sphinx.cli", *args]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=cwd)
    if kill is not None:
        assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    else:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# the first tensor, a middle one, and the last file before the folder is renamed into place
MIX_KILLS = ["modeling_sphinx.folder.shards:StreamingShardWriter.write:1:before",
             "modeling_sphinx.folder.shards:StreamingShardWriter.write:5:after", "modeling_sphinx.mixing.engine:_write_card:1:after"]  # fmt: skip


def test_mix_killed_while_writing_leaves_nothing_and_runs_again(tiny_model_dir, tmp_path):
    first = tiny_model_dir("sphinx-1k")
    recipe = {"merge_method": "linear", "base_model": str(first),
              "models": [{"model": str(first), "parameters": {"weight": 0.3}},
                         {"model": str(first), "parameters": {"weight": 0.7}}]}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for kill in MIX_KILLS:
        _run(["mix", "recipe.yaml", "out"], tmp_path, kill=kill)
        assert _visible(tmp_path) == ["recipe.yaml"], kill  # only hidden staging folders of killed processes
    _run(["mix", "recipe.yaml", "out"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]  # the abandoned staging is gone
    _run(["mix", "recipe.yaml", "again"], tmp_path)
    mixed, again = _weights(tmp_path / "out"), _weights(tmp_path / "again")
    assert mixed.keys() == again.keys() and all(torch.equal(mixed[k], again[k]) for k in mixed)


CONVERT_KILLS = ["modeling_sphinx.folder.shards:StreamingShardWriter.write:1:after",
                 "modeling_sphinx.folder.shards:StreamingShardWriter.write:10:after",
                 "modeling_sphinx.folder.card:write_model_card:1:after"]  # fmt: skip


def test_convert_killed_while_writing_leaves_nothing_and_runs_again(tmp_path):
    fixture = PARITY / "llama_ens5_light"
    manifest = json.loads((fixture / "manifest.json").read_text())
    (tmp_path / "sizes.json").write_text(json.dumps(manifest["size_changes_vs_real_model"]))
    args = ["convert", str(fixture / "checkpoint"), "hf", "--encoder-sizes", "sizes.json"]
    for kill in CONVERT_KILLS:
        _run(args, tmp_path, kill=kill)
        assert _visible(tmp_path) == ["sizes.json"], kill
    _run(args, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "sizes.json"]
    assert (tmp_path / "hf" / "config.json").is_file() and _weights(tmp_path / "hf")


def test_train_killed_resumes_from_the_last_complete_checkpoint_to_the_same_weights(world, tiny_model_dir, tmp_path):
    """The smoke preset's 8 steps (checkpoints at 4 and 8), killed between steps 5 and 6; the resumed run killed
    inside checkpoint-8's save, after its weights and before its optimizer state; then resumed to the end."""
    model = tiny_model_dir("sphinx")
    _run(train_args(model, world, tmp_path / "whole"), tmp_path)
    uninterrupted = _weights(tmp_path / "whole" / "model")
    out = tmp_path / "run"
    resume = ["--resume_from_checkpoint", str(out / "checkpoint-4")]
    kills = [([], "transformers.trainer:Trainer.training_step:6:before"),
             (resume, "transformers.trainer:Trainer._save_optimizer_and_scheduler:1:before")]  # fmt: skip
    for extra, kill in kills:
        _run(train_args(model, world, out, *extra), tmp_path, kill=kill)
        assert _visible(out) in (["checkpoint-4"], ["README.md", "checkpoint-4"]), (kill, _visible(out))
        assert (out / "checkpoint-4" / "trainer_state.json").is_file() and not (out / "model").exists()
    _run(train_args(model, world, out, *resume), tmp_path)
    resumed = _weights(out / "model")
    assert resumed.keys() == uninterrupted.keys()
    largest = max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed)
    assert largest <= 1e-6, largest
    assert not list(out.glob(".checkpoint-*.partial"))


def test_eval_killed_resumes_to_the_same_metrics(quick_demo, tmp_path):
    model = quick_demo[0] / "best"
    split = next((quick_demo[0] / "data").glob("real-1???????"))
    args = ["eval", str(model), "--task", "rec", "--data", str(split / "grounding.jsonl"), "--batch-size", "2"]
    _run([*args, "--out", "whole"], tmp_path)
    # killed in its first batch, then resumed and killed in its third: batches 1 and 2 kept, two answers each
    for extra, batch, kept in [([], 1, 0), (["--resume"], 3, 4)]:
        _run(
            [*args, "--out", "cut", *extra], tmp_path, kill=f"modeling_sphinx.inference:generate_answers:{batch}:after"
        )
        assert not (tmp_path / "cut" / "metrics.json").exists()
        assert len((tmp_path / "cut" / "predictions.jsonl").read_text().splitlines()) == kept, batch
    _run([*args, "--out", "cut", "--resume"], tmp_path)
    whole, cut = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "cut"))
    assert cut["metrics"] == whole["metrics"]
    assert (tmp_path / "cut" / "predictions.jsonl").read_text() == (
        tmp_path / "whole" / "predictions.jsonl"
    ).read_text()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# the quick budget trains 12 caption steps on the real-like domain, 12 more continued on the synthetic one, then
# 16 of stage 2 from their mix: step 5 is inside the first caption stage, step 30 inside stage 2 (the re-run redoes
# the first caption stage from its step 1); (step, the stage it dies in, what finishes after the previous kill and
# before this one)
DEMO_KILLS = [(5, "stage1-real", ["init/model.safetensors"]),
              (30, "stage2-mix-beta=0.5", ["stage1-real/model/model.safetensors",
                                           "stage1-synthetic/model/model.safetensors",
                                           "mix-beta=0.5/model.safetensors"])]  # fmt: skip


def test_demo_killed_redoes_only_its_unfinished_stage(quick_demo, tmp_path):
    out = tmp_path / "demo"
    finished = {}
    for step, unfinished, done in DEMO_KILLS:
        _run(
            ["demo", "--quick", "--out", str(out)],
            tmp_path,
            kill=f"transformers.trainer:Trainer.training_step:{step}:before",
        )
        assert {name: _digest(out / name) for name in finished} == finished  # what had finished was reused
        finished.update({name: _digest(out / name) for name in done})
        assert not (out / unfinished / "model").exists() and not (out / "results.json").exists()
    _run(["demo", "--quick", "--out", str(out)], tmp_path)
    assert {name: _digest(out / name) for name in finished} == finished  # reused, not redone
    assert json.loads((out / "results.json").read_text()) == json.loads((quick_demo[0] / "results.json").read_text())
    shutil.rmtree(out)
