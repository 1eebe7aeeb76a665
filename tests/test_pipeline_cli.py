import json
import os
import re
import stat
import subprocess
import sys

import pytest
import yaml
from PIL import Image
from transformers import pipeline

from modeling_sphinx import SPHINX_VARIANTS
from modeling_sphinx.cli import main

from .helpers import IMAGES, image_message


@pytest.mark.parametrize("variant", sorted(SPHINX_VARIANTS))
def test_pipeline_answers_chat_with_image_for_every_variant(tiny_model_dir, variant):
    pipe = pipeline("image-text-to-text", model=str(tiny_model_dir(variant)))
    messages = image_message("What is shown in this image?", path=IMAGES / "rocket.jpg")
    out = pipe(text=messages, max_new_tokens=3)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)
    only_new = pipe(text=messages, max_new_tokens=3, return_full_text=False)
    assert only_new[0]["generated_text"] == reply["content"]


def test_pipeline_batches_chats(tiny_model_dir):
    pipe = pipeline("image-text-to-text", model=str(tiny_model_dir("sphinx")))
    chats = [
        image_message("What is it?", image=Image.open(IMAGES / "chelsea.png")),
        image_message("Describe this page in detail please.", image=Image.open(IMAGES / "page.png")),
    ]
    batched = pipe(text=chats, max_new_tokens=3, batch_size=2, return_full_text=False)
    single = [pipe(text=chat, max_new_tokens=3, return_full_text=False)[0] for chat in chats]
    assert [b[0]["generated_text"] for b in batched] == [s["generated_text"] for s in single]


def test_cli_init_and_chat(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["init", "--variant", "sphinx-tiny", "--tiny", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "modeling_sphinx.py").is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # readable by a server under another user
    assert main(["init", "--variant", "sphinx-tiny", "--tiny", str(out)]) == 2  # refuses to overwrite
    assert "exists and is not empty" in capsys.readouterr().err

    drawing = tmp_path / "boxes.png"
    code = main(
        ["chat", str(out), "--image", str(IMAGES / "astronaut.png"), "--prompt", "Hi", "--max-new-tokens", "3"]
        + ["--draw", str(drawing)]
    )
    assert code == 0
    assert re.search(r"drew \d+ box(es)? and \d+ points? into", capsys.readouterr().out)
    assert Image.open(drawing).size == (512, 512)

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    assert main(["chat", str(out), "--image", str(bad), "--prompt", "Hi"]) == 2
    assert f"cannot decode image file '{bad}'" in capsys.readouterr().err


def test_cli_init_full_size_needs_tokenizer(tmp_path, capsys):
    assert main(["init", "--variant", "sphinx", str(tmp_path / "big")]) == 2
    assert "tokenizer.model" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


LAUNCH = """
import json, sys
import sphinx_mllm_cli
sys.argv = ["sphinx-mllm", *sys.argv[1:]]
try:
    code = sphinx_mllm_cli.main()
except SystemExit as stop:
    code = stop.code
heavy = ("torch", "transformers.modeling_utils", "timm", "torchvision", "modeling_sphinx.modeling_sphinx")
print(json.dumps({"code": code, "imported": [m for m in heavy if m in sys.modules]}))
"""


def _launch(*args, cwd):
    result = subprocess.run(
        [sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.slow
def test_help_and_light_commands_do_not_import_the_model_stack(tiny_model_dir, tmp_path):
    report, _ = _launch("--help", cwd=tmp_path)
    assert report == {"code": 0, "imported": []}
    report, err = _launch("push", str(tmp_path / "missing"), "--repo-id", "me/model", cwd=tmp_path)
    assert report == {"code": 2, "imported": []} and "not a folder" in err
    folder = tiny_model_dir("sphinx")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"merge_method": "linear", "models": [{"model": str(folder), "parameters": {"weight": 0.5}}] * 2}
        )
    )
    report, err = _launch("mix", str(recipe), str(tmp_path / "mixed"), cwd=tmp_path)
    assert report["code"] == 0, err
    # mixing needs torch, not transformers' model code or timm; the card, written last, reads the config with
    # transformers' config classes, whose auto module brings torchvision in
    assert set(report["imported"]) <= {"torch", "torchvision"} and "torch" in report["imported"]
    assert (tmp_path / "mixed" / "model.safetensors").is_file()
    report, err = _launch("init", "--variant", "sphinx", "--tiny", str(tmp_path / "made"), cwd=tmp_path)
    assert report["code"] == 0, err
    assert "modeling_sphinx.modeling_sphinx" in report["imported"]  # model commands register the classes


def test_cli_explains_missing_models_and_an_unreachable_hub(tiny_model_dir, tmp_path, capsys, monkeypatch):
    image = str(IMAGES / "astronaut.png")
    assert main(["chat", str(tmp_path / "no-such-model"), "--image", image, "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert f"model folder '{tmp_path / 'no-such-model'}' does not exist" in err
    assert "Traceback" not in err and err.count("\n") == 1

    monkeypatch.setenv("HF_TOKEN", "hf_unused")
    assert main(["push", str(tiny_model_dir("sphinx")), "--repo-id", "me/model"]) == 2  # tests run offline
    err = capsys.readouterr().err
    assert err.startswith("sphinx-mllm push: error: cannot reach the Hub at ") and "offline mode" in err
    assert "hf_unused" not in err
