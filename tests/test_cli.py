"""The installed `sphinx-mllm` console script, as a user runs it: every command of the table answers `--help`, runs,
and turns bad input into one line on stderr with exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_sphinx.cli import COMMANDS, build_parser

from .helpers import IMAGES, write_jsonl

CONSOLE_SCRIPT = Path(sys.executable).with_name("sphinx-mllm")


def sphinx_mllm(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([str(CONSOLE_SCRIPT), *argv], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def command_lines() -> list[list[str]]:
    """Every command of the table, and every subcommand, as the words that name it."""
    found = []
    for command in COMMANDS:
        found.append([command.name])
        found += [[command.name, sub.name] for sub in command.subcommands]
    return found


def test_every_command_of_the_table_answers_help(tmp_path):
    assert CONSOLE_SCRIPT.is_file(), "the test extra installs the package with its console script"
    top = sphinx_mllm("--help", cwd=tmp_path)
    assert top.returncode == 0 and all(command.name in top.stdout for command in COMMANDS)
    for words in command_lines():
        shown = sphinx_mllm(*words, "--help", cwd=tmp_path)
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: sphinx-mllm {' '.join(words)}"), words


@pytest.mark.slow
def test_the_commands_that_load_models_register_them_once_through_the_launcher(tmp_path):
    """`init`, `chat` and `eval` run from the console script, whose launcher defers the Auto-class registration
    to the table: a command that needs models and did not get them would fail here, not only for users."""
    tiny = tmp_path / "tiny"
    assert sphinx_mllm("init", "--variant", "sphinx-1k", "--tiny", str(tiny), cwd=tmp_path).returncode == 0
    image = str(IMAGES / "chelsea.png")
    chat = sphinx_mllm("chat", str(tiny), "--image", image, "--prompt", "Hi", "--max-new-tokens", "2", cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr[-2000:]
    write_jsonl(tmp_path / "vqa.jsonl", [{"id": "a", "image": image, "question": "What is it?", "answer": "cat"}])
    evaluated = sphinx_mllm("eval", str(tiny), "--task", "vqa", "--data", str(tmp_path / "vqa.jsonl"),
                            "--out", str(tmp_path / "eval"), "--max-new-tokens", "2", cwd=tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert (tmp_path / "eval" / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["convert", "missing", "out"], "sphinx-mllm convert: error: "),
        (["mix", "missing.yaml", "out"], "sphinx-mllm mix: error: recipe file 'missing.yaml' does not exist"),
        (["train", "missing.yaml"], "sphinx-mllm train: error: training config 'missing.yaml' does not exist"),
        (["push", "missing", "--repo-id", "me/x"], "sphinx-mllm push: error: "),
        (["serve", "missing", "--host", "0.0.0.0"], "sphinx-mllm serve: error: --host 0.0.0.0 lets anyone"),
        (["chat", "missing", "--image", "nowhere.png"], "sphinx-mllm chat: error: "),
        (["demo", "ablations", "--out", "run", "--seed", "1"], "sphinx-mllm demo: error: "),
        (["demo", "pretrain", "full"], "sphinx-mllm demo: error: "),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, words, expected):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("")  # an output folder that is not empty
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "budget.json").write_text('{"seed": 0}')  # a run folder of another seed and budget
    run = sphinx_mllm(*words, cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), run.stderr[-2000:]


def test_the_old_spelling_of_demo_ablations_still_parses():
    old = build_parser().parse_args(["demo", "--ablations", "--seed", "1"])
    new = build_parser().parse_args(["demo", "ablations", "--seed", "1"])
    assert old.ablations and old.seed == new.seed == 1 and new.command.name == "ablations"
    inherited = build_parser().parse_args(["demo", "--seed", "2", "--out", "x", "ablations"])
    assert (inherited.seed, inherited.out, inherited.command.name) == (2, "x", "ablations")
