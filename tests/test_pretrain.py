"""The miniature's pretrained parts: `sphinx-mllm demo pretrain`, and the parts the package ships."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_sphinx.cli import main
from modeling_sphinx.inference import load_pretrained
from modeling_sphinx.miniature.pretrain import (
    ENCODERS,
    FULL_PRETRAINING,
    PART_PREFIXES,
    SHIPPED,
    Measurement,
    PretrainBudget,
    init_miniature,
    load_parts,
)
from modeling_sphinx.miniature.world import MINIATURE


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    return load_pretrained(str(init_miniature(tmp_path_factory.mktemp("miniature") / "init")), dtype="float32")


def test_quick_pretraining_writes_parts_that_load_into_the_miniature(tmp_path, miniature, capsys):
    out = tmp_path / "parts"
    assert main(["demo", "pretrain", str(out), "--quick"]) == 0
    assert f"wrote the pretrained parts to {out}" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("sphinx-mllm demo pretrain OUT") and manifest["seed"] == 0
    assert set(manifest["losses"]) == {*ENCODERS, "llm"}
    for metrics in (manifest["metrics"], manifest["metrics_at_random_init"]):
        assert set(metrics) == {*ENCODERS, "llm"}
        assert all(0 <= v <= 1 for name in ENCODERS for v in metrics[name].values())
    parts = load_file(out / "parts.safetensors")
    assert parts and all(key.startswith(PART_PREFIXES) for key in parts)
    assert {key.split(".")[1] for key in parts if key.startswith("model.")} == {*ENCODERS, "language_model"}
    _, model = miniature
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_parts(model, out)
    after = model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in parts.items())
    untouched = [k for k in after if not k.startswith(PART_PREFIXES)]
    assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)  # projector, start/end
    model.load_state_dict(before)
    assert (out / "tokenizer.model").read_bytes() == (SHIPPED / "tokenizer.model").read_bytes()  # deterministic

    assert main(["demo", "pretrain", str(out), "--quick"]) == 2  # refuses to overwrite
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["demo", "pretrain"]) == 2
    assert "the following arguments are required: target" in capsys.readouterr().err


def test_parts_of_another_model_are_refused(tmp_path, miniature):
    from safetensors.torch import save_file

    save_file({"model.clip.not_a_tensor_of_ours": torch.zeros(1)}, tmp_path / "parts.safetensors")
    with pytest.raises(ValueError, match="tensors the model does not have"):
        load_parts(miniature[1], tmp_path)


@pytest.mark.slow
def test_the_shipped_parts_load_and_reproduce_their_recorded_metrics(miniature):
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 10 * 1024**2
    assert manifest["budget"] == asdict(FULL_PRETRAINING) and "--quick" not in manifest["command"]
    assert manifest["miniature"] == json.loads(json.dumps(MINIATURE))  # made for the geometry the demo builds
    processor, model = miniature
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        measure = Measurement.make(processor, model, PretrainBudget(**manifest["budget"]))
        at_random_init = measure(model)
        load_parts(model)
        pretrained = measure(model)
    finally:
        model.load_state_dict(state)
    for measured, recorded in (
        (at_random_init, manifest["metrics_at_random_init"]),
        (pretrained, manifest["metrics"]),
    ):
        for name in ENCODERS:  # a probe scores a few hundred scenes: 0.02 is a handful of them
            assert measured[name] == pytest.approx(recorded[name], abs=0.02), name
        perplexities = measured["llm"]["held_out_perplexity"], recorded["llm"]["held_out_perplexity"]
        assert perplexities[0] == pytest.approx(perplexities[1], rel=0.01)


def test_every_part_learned_its_own_objective():
    """What the recorded numbers say (the test above holds the metrics to what the shipped parts do)."""
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    for part, losses in manifest["losses"].items():
        assert losses["last"] < losses["first"], part
    trained, random_init = manifest["metrics"]["llm"], manifest["metrics_at_random_init"]["llm"]
    assert trained["held_out_perplexity"] < random_init["held_out_perplexity"] / 10
    assert manifest["seconds"] <= 3600 and manifest["torch_threads"] == 2


@pytest.mark.slow
def test_a_built_wheel_ships_the_parts_and_the_card_template(tmp_path):
    """`pip install .` (not only `-e`) has the parts and the model card template: they are package data of the
    wheel, the template the repository's own `model_card.md`."""
    repo = Path(__file__).resolve().parents[1]
    leftover = not (repo / "build").exists()  # setuptools builds in the tree; leave it as it was
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_NO_INDEX": "1"},  # builds with the installed setuptools, offline
    )
    if leftover:
        shutil.rmtree(repo / "build", ignore_errors=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    assert {f"modeling_sphinx/miniature/pretrained/{p.name}" for p in SHIPPED.iterdir()} <= names
    assert archive.read("modeling_sphinx/folder/model_card.md") == (repo / "model_card.md").read_bytes()
