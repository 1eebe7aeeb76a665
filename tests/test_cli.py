"""The installed `sphinx-mllm` console script, as a user runs it: every command of the table answers `--help`, runs,
and turns bad input into one line on stderr with exit status 2."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_sphinx.cli import COMMANDS, build_parser, main

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
        (["demo", "ablations", "--out", "run", "--seed", "1"], "sphinx-mllm demo ablations: error: "),
        (["demo", "pretrain", "full"], "sphinx-mllm demo pretrain: error: "),
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


def broken_copy(folder: Path, to: Path, damage) -> Path:
    """A copy of a model folder with `damage(weights_path)` applied to its weights."""
    import shutil

    copy = shutil.copytree(folder, to)
    damage(copy / "model.safetensors")
    return copy


def truncate(path: Path):
    os.truncate(path, path.stat().st_size // 2)


def poison(path: Path):
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    weights["lm_head.weight"][0, 0] = float("inf")
    save_file(weights, path, metadata={"format": "pt"})


# every class of bad input a command takes, each with the words its one line must hold; all are refused before a
# model loads, except the damaged weights, which only loading (or `push`'s check) can find
BAD_INPUT = {
    "missing model folder": (["chat", "/abs/missing", "--image", "IMG", "--prompt", "q"], "'/abs/missing' does not"),
    "relative missing folder": (["chat", "runs/demo/best", "--image", "IMG", "--prompt", "q"], "model folder 'runs"),
    "a folder that is no model": (["chat", "plain", "--image", "IMG", "--prompt", "q"], "has no config.json"),
    "a file as model": (["chat", "file.txt", "--image", "IMG", "--prompt", "q"], "'file.txt' is a file"),
    "truncated weights": (["chat", "TRUNCATED", "--image", "IMG", "--prompt", "q"], "not a complete model folder"),
    "empty prompt": (["chat", "TINY", "--image", "IMG", "--prompt", " "], "--prompt is empty"),
    "no tokens to generate": (["chat", "TINY", "--image", "IMG", "--max-new-tokens", "-5"], "at least 1, got -5"),
    "draw into a missing folder": (["chat", "TINY", "--image", "IMG", "--draw", "nodir/a.png"], "'nodir' does not"),
    "draw into a text file": (["chat", "TINY", "--image", "IMG", "--draw", "a.txt"], "not an image file name"),
    "missing image": (["chat", "TINY", "--image", "missing.png", "--prompt", "q"], "missing.png"),
    "empty image": (["chat", "TINY", "--image", "empty.png", "--prompt", "q"], "empty.png"),
    "a folder as image": (["chat", "TINY", "--image", "plain", "--prompt", "q"], "plain"),
    "a device this machine lacks": (["chat", "TINY", "--image", "IMG", "--device-map", "cuda"], "no cuda device"),
    "a device that is none": (["chat", "TINY", "--image", "IMG", "--device-map", "gpu"], "is not a device"),
    "eval limit 0": (["eval", "TINY", "--task", "vqa", "--data", "vqa.jsonl", "--limit", "0"], "at least 1, got 0"),
    "eval limit -1": (["eval", "TINY", "--task", "vqa", "--data", "vqa.jsonl", "--limit", "-1"], "at least 1, got -1"),
    "eval batch 0": (["eval", "TINY", "--task", "vqa", "--data", "vqa.jsonl", "--batch-size", "0"], "at least 1"),
    "eval unknown task": (["eval", "TINY", "--task", "vq", "--data", "vqa.jsonl"], "did you mean 'vqa'"),
    "eval missing data": (["eval", "TINY", "--task", "vqa", "--data", "missing.jsonl"], "does not exist"),
    "eval empty data": (["eval", "TINY", "--task", "vqa", "--data", "empty.jsonl"], "no rows to evaluate"),
    "eval data of the wrong format": (["eval", "TINY", "--task", "vqa", "--data", "file.txt"], "unknown data format"),
    "eval data without the columns": (["eval", "TINY", "--task", "rec", "--data", "vqa.jsonl"], "missing columns"),
    "eval into a file": (["eval", "TINY", "--task", "vqa", "--data", "vqa.jsonl", "--out", "file.txt"], "is a file"),
    "convert missing encoder sizes": (["convert", "plain", "out", "--encoder-sizes", "x.json"], "'x.json' does not"),
    "mix into a file": (["mix", "recipe.yaml", "file.txt"], "'file.txt' is a file"),
    "mix a folder as recipe": (["mix", "plain", "out"], "is a folder; give the YAML file"),
    "mix an empty recipe": (["mix", "empty.yaml", "out"], "(it is empty)"),
    "mix a binary recipe": (["mix", "binary.yaml", "out"], "not a text file"),
    "mix broken YAML": (["mix", "broken.yaml", "out"], "not valid YAML at line 2"),
    "mix a NaN weight": (["mix", "nan.yaml", "out"], "parameter 'weight' must be a finite number, got nan"),
    "train an empty config": (["train", "empty.yaml"], "training config is a mapping"),
    "train broken YAML": (["train", "broken.yaml"], "not valid YAML at line 2"),
    "init into a file": (["init", "--tiny", "file.txt"], "is a file; choose a new path"),
    "init into a full folder": (["init", "--tiny", "full"], "exists and is not empty"),
    "serve on port 0": (["serve", "TINY", "--port", "0"], "a port is 1 to 65535"),
    "push truncated weights": (["push", "TRUNCATED", "--repo-id", "me/x"], "truncated"),
    "push infinite weights": (["push", "POISONED", "--repo-id", "me/x"], "NaN or infinite"),
    "convert a missing folder": (["convert", "missing", "out"], "missing"),
    "an unknown option": (["chat", "TINY", "--image", "IMG", "--promt", "q"], "unrecognized arguments: --promt"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    """A folder of the files the table names: good, empty, binary, broken, and damaged models."""
    root = tmp_path_factory.mktemp("inputs")
    tiny = tiny_model_dir("sphinx")
    (root / "plain").mkdir()
    (root / "full").mkdir()
    (root / "full" / "x").write_text("")
    for name in ("file.txt", "empty.png", "empty.yaml", "empty.jsonl"):
        (root / name).write_text("")
    (root / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (root / "broken.yaml").write_text("a: [\n")
    (root / "recipe.yaml").write_text(
        f"merge_method: linear\nmodels:\n  - model: {tiny}\n    parameters: {{weight: 1}}\n"
    )
    (root / "nan.yaml").write_text(
        f"merge_method: linear\nmodels:\n  - model: {tiny}\n    parameters: {{weight: .nan}}\n"
    )
    write_jsonl(root / "vqa.jsonl", [{"image": str(IMAGES / "chelsea.png"), "question": "What?", "answer": "cat"}])
    words = {
        "TINY": str(tiny),
        "IMG": str(IMAGES / "chelsea.png"),
        "TRUNCATED": str(broken_copy(tiny, root / "truncated", truncate)),
        "POISONED": str(broken_copy(tiny, root / "poisoned", poison)),
    }
    return root, words


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_every_class_of_bad_input_is_one_line_and_exit_status_2(inputs, case, capsys, monkeypatch):
    root, words = inputs
    argv, expected = BAD_INPUT[case]
    monkeypatch.chdir(root)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code = main([words.get(word, word) for word in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"sphinx-mllm {argv[0]}: error: ") and expected in err, err
    assert not (root / "out").exists()


def test_an_internal_failure_is_one_line_exit_1_with_the_way_to_the_traceback(tmp_path, capsys, monkeypatch):
    import modeling_sphinx.folder.create

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(modeling_sphinx.folder.create, "init_model", broken)
    assert main(["init", "--tiny", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error, RuntimeError: something inside broke" in err
    assert "sphinx-mllm --debug init" in err and "SPHINX_MLLM_DEBUG=1" in err
    with pytest.raises(RuntimeError, match="something inside broke"):
        main(["--debug", "init", "--tiny", str(tmp_path / "m")])
    monkeypatch.setenv("SPHINX_MLLM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something inside broke"):
        main(["init", "--tiny", str(tmp_path / "m")])


def test_ctrl_c_is_exit_status_130_without_a_word(tmp_path, capsys, monkeypatch):
    import modeling_sphinx.folder.create

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(modeling_sphinx.folder.create, "init_model", interrupted)
    assert main(["init", "--tiny", str(tmp_path / "m")]) == 130
    assert capsys.readouterr().err == ""


def test_version_and_defaults_in_help(capsys):
    assert main(["--version"]) == 0
    assert re.fullmatch(r"sphinx-mllm \S+ \(transformers \S+, torch \S+\)\n", capsys.readouterr().out)
    assert main(["chat", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "longest answer, in tokens (default: 256)" in shown and "(default: auto)" in shown
    assert "(default: None)" not in shown


@pytest.mark.slow
def test_ctrl_c_at_the_interactive_prompt_ends_quietly_with_130(tiny_model_dir, tmp_path):
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    argv = [str(CONSOLE_SCRIPT), "chat", str(tiny_model_dir("sphinx")), "--image", str(IMAGES / "chelsea.png")]
    # a shell's background job ignores SIGINT, and a child would inherit that: give it the default, as a terminal does
    chat = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    shown = b""
    while b"human> " not in shown and time.monotonic() < deadline:
        shown += chat.stdout.read1(100)
    assert b"an empty line or Ctrl-D ends the conversation" in shown
    chat.send_signal(signal.SIGINT)
    chat.wait(timeout=60)  # with stdin still open: closing it first would end the conversation by EOF instead
    err = chat.stderr.read().decode()
    assert chat.returncode == 130 and "Traceback" not in err and "error" not in err
