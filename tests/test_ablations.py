"""The ablations: `sphinx-mllm demo --ablations --quick` reuses the main job's stages, gives every
arm the same budget, and reports, plots and judges each comparison from its numbers."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from modeling_sphinx import SphinxConfig
from modeling_sphinx.cli import main
from modeling_sphinx.miniature.ablations import (
    ALL_TASKS,
    ALONE,
    ENCODER_ARMS,
    GENERIC,
    GENERIC_INSTRUCTION,
    THREE_ENCODERS,
    TRAINED_TASK,
    format_ablations,
    single_task_steps,
)
from modeling_sphinx.miniature.recipe import QUICK_BUDGET, TASK_WEIGHTS

pytestmark = pytest.mark.slow

CELLS = [f"{task} {domain}" for domain in ("real", "synthetic") for task in TRAINED_TASK]


@pytest.fixture(scope="module")
def ablated(quick_demo, tmp_path_factory):
    """The quick ablations run by the CLI in a copy of the quick main job's folder:
    `(folder, results, stdout, stderr, modification times of the main job's stage-2 weights before)`."""
    out = tmp_path_factory.mktemp("ablations") / "demo"
    shutil.copytree(quick_demo[0], out)
    weights = {p: p.stat().st_mtime_ns for p in out.glob("stage*/model/model.safetensors")}
    run = subprocess.run(
        [sys.executable, "-m", "modeling_sphinx.cli", "demo", "ablations", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "ablations" / "results.json").read_text())
    return out, results, run.stdout, run.stderr, weights


def test_single_task_models_get_their_share_of_the_mixed_steps():
    steps = single_task_steps(QUICK_BUDGET)
    assert steps == {"vqa": 4, "referring_expression": 8, "region_caption": 2, "detection": 2}
    assert sum(steps.values()) == QUICK_BUDGET.task_steps and set(steps) == set(TASK_WEIGHTS)


def test_every_arm_is_scored_on_every_task_and_domain(ablated):
    out, results, _, _, weights = ablated
    assert {p: p.stat().st_mtime_ns for p in weights} == weights  # the main job's stages were reused
    arms = {"task mix": [ALL_TASKS, ALONE, GENERIC],
            "visual-embedding mix": [THREE_ENCODERS] + [f"{n} alone" for n in ENCODER_ARMS.values()]}  # fmt: skip
    held_out = out / "data" / "real-40000000"
    counts = {"VQA": 12, "grounding": 8, "region-caption": 8}
    counts["detection"] = len((held_out / "detection.jsonl").read_text().splitlines())
    for ablation, names in arms.items():
        assert list(results[ablation]["arms"]) == names
        for summary in results[ablation]["arms"].values():
            assert list(summary) == [*CELLS, "average"]
            assert all(c["low"] <= c["score"] <= c["high"] for c in summary.values())
            assert summary["detection real"]["questions"] == counts["detection"]
            assert [summary[f"{t} real"]["questions"] for t in ("VQA", "grounding", "region-caption")] == [12, 8, 8]
    assert results["visual-embedding mix"]["arms"][THREE_ENCODERS] == results["task mix"]["arms"][ALL_TASKS]
    assert results["visual-embedding mix"]["best single encoder"] in arms["visual-embedding mix"][1:]


def test_every_arm_gets_the_same_budget(ablated):
    out, results, _, _, _ = ablated
    budgets = results["task mix"]["budgets"]
    mixed, generic, alone = budgets[ALL_TASKS], budgets[GENERIC], budgets[ALONE]
    assert mixed == generic and mixed["steps"] == QUICK_BUDGET.task_steps
    for name, task in TRAINED_TASK.items():  # as many samples of its task as the mixed model, same settings
        assert alone[name]["samples"] == {task: mixed["samples"][task]}
        assert (alone[name]["batch_size"], alone[name]["learning_rate"]) == (
            mixed["batch_size"],
            mixed["learning_rate"],
        )
    recipes = results["visual-embedding mix"]["budgets"]
    assert len({json.dumps(recipe, sort_keys=True) for recipe in recipes.values()}) == 1
    assert recipes[THREE_ENCODERS]["stage 2"] == mixed
    for encoder in ENCODER_ARMS:  # each single-encoder recipe reads through that encoder only
        config = SphinxConfig.from_pretrained(
            out / "ablations" / f"encoder-{encoder}" / "stage2-mix-beta=0.5" / "model"
        )
        present = [name for name in ENCODER_ARMS if getattr(config, f"{name}_config") is not None]
        assert present == [encoder] and config.num_image_tokens == 95


def test_the_generic_arm_trains_and_is_asked_with_one_instruction(ablated):
    out, _, _, _, _ = ablated
    sources = yaml.safe_load((out / "ablations" / "generic-instruction.yaml").read_text())["sources"]
    assert {s["options"]["prompt_template"] for s in sources} == {GENERIC_INSTRUCTION}
    assert {s["task"] for s in sources} == set(TASK_WEIGHTS)
    for task in ("real-vqa", "real-rec", "real-region_caption", "real-detection"):
        first = json.loads(
            (out / "ablations" / "eval" / "generic-instruction" / task / "predictions.jsonl").open().readline()
        )
        assert first["prompt"].startswith("Answer about the image: "), first


def test_the_console_and_report_show_tables_verdicts_and_plots(ablated):
    out, results, printed, errors, _ = ablated
    lines = printed.splitlines()
    assert lines[0] == "## task mix" and "## visual-embedding mix" in lines
    assert sum(line.startswith("| all tasks") or line.startswith("| each task") for line in lines) == 3
    verdicts = [line for line in lines if ", average of the cells, " in line]
    assert len(verdicts) == 2 + 3
    assert lines[-1].startswith("tables, plots and results: ")
    assert (out / "ablations" / "report.md").read_text() == "\n".join(lines[:-1]) + "\n"
    bars = [line for line in errors.replace("\r", "\n").splitlines() if line.strip()]
    assert all(line.startswith(("stage 1 (", "stage 2", "eval, ")) for line in bars), bars[:5]
    for name in ("task_mix.png", "visual_embedding_mix.png"):
        plot = Image.open(out / "ablations" / name)
        colours = np.unique(np.asarray(plot.convert("RGB")).reshape(-1, 3), axis=0)
        assert plot.width > 800 and len(colours) > 10  # drawn, not blank


def test_each_verdict_follows_its_numbers(ablated):
    _, results, _, _, _ = ablated
    found = json.loads(json.dumps(results))
    better, worse = {"difference": 0.04, "low": 0.01, "high": 0.07}, {"difference": -0.04, "low": -0.07, "high": -0.01}
    pairs = list(found["task mix"]["comparisons"])
    found["task mix"]["comparisons"] = {pairs[0]: better, pairs[1]: worse}
    best = found["visual-embedding mix"]["best single encoder"]
    found["visual-embedding mix"]["comparisons"] = {f"{THREE_ENCODERS} - {best}": better}
    lines = [line for line in format_ablations(found).splitlines() if ", average of the cells, " in line]
    assert lines[0].endswith("+0.040 (95 % interval +0.010 to +0.070): better: the paper's direction "
                             "(multi-task >= single-task) holds")  # fmt: skip
    assert lines[1].endswith("worse: the paper's direction (task-specific instructions >= one generic "
                             "instruction) does not hold here")  # fmt: skip
    assert lines[2].endswith("(three encoders >= the best single encoder) holds")


def test_a_folder_of_another_budget_or_seed_is_not_reused(ablated, capsys):
    out, _, _, _, _ = ablated
    assert main(["demo", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "holds the stages of a run with train_images 64 (now 800)" in error and "pass --force" in error
    assert main(["demo", "--quick", "--ablations", "--seed", "1", "--out", str(out)]) == 2  # the old spelling
    assert "seed 0 (now 1)" in capsys.readouterr().err
    assert main(["demo", "ablations", "--quick", "--seed", "1", "--out", str(out)]) == 2
    assert "seed 0 (now 1)" in capsys.readouterr().err
