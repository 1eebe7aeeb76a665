import contextlib
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import modeling_sphinx  # noqa: E402,F401  (registers the Auto classes)
from modeling_sphinx.build import init_model  # noqa: E402
from modeling_sphinx.cli import main  # noqa: E402

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
    """`sphinx-mllm demo --quick` run once for the session: `(output folder, what it printed)`."""
    out = tmp_path_factory.mktemp("quick-demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, printed.getvalue()


def image_message(text: str, image=None, path=None) -> list[dict]:
    block = {"type": "image", "image": image} if image is not None else {"type": "image", "path": str(path)}
    return [{"role": "user", "content": [block, {"type": "text", "text": text}]}]
