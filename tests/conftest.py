import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import modeling_sphinx  # noqa: E402,F401  (registers the Auto classes)
from modeling_sphinx.build import init_model  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
IMAGES = FIXTURES / "images"
PARITY = FIXTURES / "parity"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A factory of tiny random model folders, one per variant for the whole session."""
    made = {}

    def make(variant: str = "sphinx-1k") -> Path:
        if variant not in made:
            made[variant] = init_model(variant, tmp_path_factory.mktemp("models") / variant, tiny=True)
        return made[variant]

    return make


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`sphinx-mllm demo --quick` run once for the session, in its own process as a user runs it:
    `(output folder, what it printed on stdout, what it printed on stderr)`."""
    out = tmp_path_factory.mktemp("quick-demo") / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "modeling_sphinx.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout, run.stderr


def image_message(text: str, image=None, path=None) -> list[dict]:
    block = {"type": "image", "image": image} if image is not None else {"type": "image", "path": str(path)}
    return [{"role": "user", "content": [block, {"type": "text", "text": text}]}]
