"""Saved folders run as remote code under the transformers that serving engines pin.

vLLM 0.32-0.33 and SGLang pin transformers 5.16-5.20; the package itself needs the newest. The second
environment here is a fresh venv that sees transformers 5.19.0 first and, behind it, this environment's torch,
torchvision, timm and the other dependencies (so they are the same builds by construction), but not this
package: its folders load through `trust_remote_code` alone.
"""

import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PINNED = "5.19.0"
FAMILIES = ("sphinx-1k", "sphinx-tiny", "sphinx-moe")  # LLaMA, LLaMA "light" (no Q-Former, one encoder), Mixtral

# Per saved folder, loaded as remote code: the logits of the last prompt positions and six greedy ids
RUN_FOLDERS = """
import json, sys
import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, __version__

for folder in sys.argv[1:]:
  model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
  processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]
  prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
  inputs = processor(text=prompt, images=image, return_tensors="pt", add_special_tokens=False)
  with torch.no_grad():
      logits = model(**inputs).logits[0, -8:]
      ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
  print(json.dumps({"transformers": __version__, "module": type(model).__module__, "logits": logits.tolist(),
                    "ids": ids.tolist()}))
"""


@pytest.fixture(scope="module")
def pinned_python(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"transformers-{PINNED}")
    overlay = root / "transformers"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(overlay)]
    subprocess.run([*install, f"transformers=={PINNED}"], check=True, capture_output=True, timeout=600)
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    # a path added by a .pth is not a site directory, so this environment's own .pth files (the editable install
    # of this package among them) are not read there
    Path(site, "overlay.pth").write_text(f"{overlay}\n{sysconfig.get_paths()['purelib']}\n")
    probe = "import importlib.util, transformers; print(transformers.__version__, importlib.util.find_spec('modeling_sphinx'))"
    seen = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=root).stdout.split()
    assert seen == [PINNED, "None"], seen
    return python


def _run(python, folders: list[Path]) -> list[dict]:
    command = [python, "-c", RUN_FOLDERS, *map(str, folders)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=folders[0].parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def both_runs(pinned_python, tiny_model_dir) -> dict[str, tuple[dict, dict]]:
    folders = [tiny_model_dir(variant) for variant in FAMILIES]
    newest, pinned = _run(sys.executable, folders), _run(pinned_python, folders)
    return dict(zip(FAMILIES, zip(newest, pinned, strict=True), strict=True))


@pytest.mark.parametrize("variant", FAMILIES)
def test_saved_folder_gives_the_same_logits_and_ids_under_the_pinned_transformers(both_runs, variant):
    newest, pinned = both_runs[variant]
    assert pinned["transformers"] == PINNED and newest["transformers"] != PINNED
    assert pinned["module"].startswith("transformers_modules.")  # the folder's own copy of the code
    pairs = zip(newest["logits"], pinned["logits"], strict=True)
    largest = max(abs(a - b) for row, other in pairs for a, b in zip(row, other, strict=True))
    assert largest <= 1e-5 and pinned["ids"] == newest["ids"]
