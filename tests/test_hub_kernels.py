"""Hub kernels stay off unless asked for: nothing fetches a kernel or prints about kernels.

Each child process loads `tests/loud_kernels/sitecustomize.py`, which makes every kernel fetcher of the `kernels`
library print a marker and raise. On a CPU transformers would find no kernel to fetch for LLaMA even when on, so
the opt-in test shows the fetchers are reached when asked for: what passes here without them passes on a GPU.
The user's commands (`init`, `train`, `chat`, `chat --load-in-4bit`, `eval`, `serve`) run under the same loud
fetchers in `tests/test_gpu_suite.py`, whose dry run checks that none prints about kernels.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .helpers import IMAGES, REPO

pytestmark = pytest.mark.slow

LOUD = Path(__file__).resolve().parent / "loud_kernels"
MARKER = "LOUD_KERNEL_FETCH"


def _run(code: str, cwd: Path, path: tuple[str, ...] = (), **env) -> subprocess.CompletedProcess:
    """`code` in a child process with loud kernel fetchers, offline, with `path` first on `PYTHONPATH`."""
    environment = {name: value for name, value in os.environ.items() if name != "USE_HUB_KERNELS"}
    environment.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", **env)
    environment["PYTHONPATH"] = os.pathsep.join([str(LOUD), *path, os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=cwd, env=environment)


def _commands(argvs: list[list[str]]) -> str:
    """A program that runs each command line through the `sphinx-mllm` launcher and prints its exit status (or the
    exception that ended it)."""
    return f"""
        import sys
        import sphinx_mllm_cli
        for argv in {argvs!r}:
            sys.argv = ["sphinx-mllm", *argv]
            try:
                print("exit", argv[0], sphinx_mllm_cli.main(), flush=True)
            except Exception as error:
                print("exit", argv[0], type(error).__name__, error, flush=True)
    """


def test_use_kernels_reaches_the_kernel_fetchers(tiny_model_dir, world, tmp_path):
    """The opt-in: `--use-kernels` (chat) and `use_kernels: true` (train) let transformers kernelize the model,
    which calls the (loud) fetchers; their failure is an internal one to the command (exit status 1)."""
    tiny = str(tiny_model_dir("sphinx"))
    argvs = [
        ["chat", tiny, "--image", str(IMAGES / "chelsea.png"), "--prompt", "Hi", "--max-new-tokens", "2",
         "--use-kernels"],
        ["train", str(REPO / "recipes" / "sft" / "smoke.yaml"), "--model_name_or_path", tiny, "--mixture",
         str(world / "mixture.yaml"), "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
         "--use_kernels", "true"],
    ]  # fmt: skip
    run = _run(_commands(argvs), tmp_path)
    assert run.stderr.count(f"{MARKER} kernelize") == 2, run.stderr[-3000:]
    assert [line for line in run.stdout.splitlines() if line.startswith("exit ")] == ["exit chat 1", "exit train 1"]
    for command in ("chat", "train"):
        assert f"sphinx-mllm {command}: error: internal error, RuntimeError: {MARKER}" in run.stderr


def test_bitsandbytes_and_pipeline_fetch_nothing_unless_asked(tiny_model_dir, tmp_path):
    """bitsandbytes fetches a Hub kernel when imported on a CPU with AVX512-BF16 and logs when it cannot; a stand-in
    that always does so shows the import guard on any CPU. `pipeline` loads through transformers' own
    `from_pretrained` call, which the model's default covers."""
    package = tmp_path / "standin" / "bitsandbytes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            import logging
            try:
                from kernels import get_kernel
                get_kernel("kernels-community/quantization-bitsandbytes", version=1)
            except Exception as exc:
                logging.getLogger(__name__).warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", exc)
            """
        )
    )
    code = f"""
        import modeling_sphinx, peft, bitsandbytes
        print("imported", bitsandbytes.__file__)
        from transformers import pipeline
        pipe = pipeline("image-text-to-text", model={str(tiny_model_dir("sphinx"))!r})
        image = {{"type": "image", "path": {str(IMAGES / "chelsea.png")!r}}}
        answer = pipe(text=[{{"role": "user", "content": [image, {{"type": "text", "text": "Hi"}}]}}], max_new_tokens=2)
        print("answered by", answer[0]["generated_text"][-1]["role"])
    """
    quiet = _run(code, tmp_path, path=(str(package.parent),))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert f"imported {package / '__init__.py'}" in quiet.stdout and "answered by assistant" in quiet.stdout
    assert "kernel" not in (quiet.stdout + quiet.stderr).lower(), quiet.stderr[-3000:]
    asked = _run("import modeling_sphinx, bitsandbytes", tmp_path, path=(str(package.parent),), USE_HUB_KERNELS="YES")
    assert f"{MARKER} get_kernel ('kernels-community/quantization-bitsandbytes',)" in asked.stderr
