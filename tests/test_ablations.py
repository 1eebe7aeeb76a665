"""The ablations: `sphinx-mllm demo ablations --quick` reuses the main job's stages, gives every arm the same
budget, and reports, plots and judges each comparison from its numbers."""

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
    BETAS,
    ENCODER_ARMS,
    GENERIC,
    GENERIC_INSTRUCTION,
    GLOBAL_ONLY,
    THREE_ENCODERS,
    TRAINED_TASK,
    WITH_SUB_IMAGES,
    beta_arm,
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


ARMS = {
    "weights": [beta_arm(beta) for beta in BETAS],
    "tasks": [ALL_TASKS, ALONE, GENERIC],
    "visual embeddings": [THREE_ENCODERS] + [f"{n} alone" for n in ENCODER_ARMS.values()],
    "scales": [WITH_SUB_IMAGES, GLOBAL_ONLY],
}


def test_every_arm_is_scored_on_every_task_and_domain(ablated):
    out, results, _, _, weights = ablated
    assert {p: p.stat().st_mtime_ns for p in weights} == weights  # the main job's stages were reused
    held_out = out / "data" / "real-40000000"
    detections = len((held_out / "detection.jsonl").read_text().splitlines())
    assert list(results) == list(ARMS)
    for ablation, names in ARMS.items():
        assert list(results[ablation]["arms"]) == names
        for summary in results[ablation]["arms"].values():
            expected = SPLIT_CELLS if ablation == "scales" else CELLS
            assert list(summary) == [*expected, "average"]
            assert all(c["low"] <= c["score"] <= c["high"] for c in summary.values())
            assert summary["detection real"]["questions"] == detections
            assert [summary[f"{t} real"]["questions"] for t in ("grounding", "region-caption")] == [8, 8]
    main_job = results["tasks"]["arms"][ALL_TASKS]
    assert (
        results["visual embeddings"]["arms"][THREE_ENCODERS] == main_job == results["weights"]["arms"][beta_arm(0.5)]
    )
    assert results["visual embeddings"]["best single encoder"] in ARMS["visual embeddings"][1:]
    scales = results["scales"]["arms"]
    assert (
        scales[WITH_SUB_IMAGES]["dot colour real"]["questions"]
        == 8
        == scales[GLOBAL_ONLY]["shape colour real"]["questions"]
    )
    assert results["scales"]["visual tokens"] == {WITH_SUB_IMAGES: 95, GLOBAL_ONLY: 19}


SPLIT_CELLS = [f"{task} {domain}" for domain in ("real", "synthetic")
               for task in ("shape colour", "dot colour", "grounding", "region-caption", "detection")]  # fmt: skip


def test_the_weight_sweep_mixes_the_line_and_its_ends_are_the_parents(ablated):
    from safetensors.torch import load_file

    out, results, _, _, _ = ablated
    real, synthetic = (
        load_file(out / f"stage1-{leg}" / "model" / "model.safetensors") for leg in ("real", "synthetic")
    )
    for beta in (0.0, 0.25, 1.0):
        mixed = load_file(out / "ablations" / f"mix-beta={beta:g}" / "model.safetensors")
        for key in real:
            torch.testing.assert_close(mixed[key], beta * real[key] + (1 - beta) * synthetic[key], rtol=0, atol=1e-6)
        start = json.loads((out / "ablations" / f"stage2-mix-beta={beta:g}" / "stage.json").read_text())["start"]
        assert start == f"mix-beta={beta:g}"
    assert list(results["weights"]["comparisons"]) == [
        f"{beta_arm(0.5)} - {beta_arm(1.0)}",
        f"{beta_arm(0.5)} - {beta_arm(0.0)}",
    ]
    assert results["weights"]["beta"] == {beta_arm(beta): beta for beta in BETAS}


def test_every_arm_gets_the_same_budget(ablated):
    out, results, _, _, _ = ablated
    budgets = results["tasks"]["budgets"]
    mixed, generic, alone = budgets[ALL_TASKS], budgets[GENERIC], budgets[ALONE]
    assert mixed == generic and mixed["steps"] == QUICK_BUDGET.task_steps
    for name, task in TRAINED_TASK.items():  # as many samples of its task as the mixed model, same settings
        assert alone[name]["samples"] == {task: mixed["samples"][task]}
        assert (alone[name]["batch_size"], alone[name]["learning_rate"]) == (
            mixed["batch_size"],
            mixed["learning_rate"],
        )
    for ablation in ("weights", "visual embeddings", "scales"):  # whole lines: each stage the same
        lines = results[ablation]["budgets"]
        assert len({json.dumps(line, sort_keys=True) for line in lines.values()}) == 1, ablation
        assert next(iter(lines.values()))["stage 2"] == mixed
    for encoder in ENCODER_ARMS:  # each single-encoder line reads through that encoder only
        config = SphinxConfig.from_pretrained(
            out / "ablations" / f"encoder-{encoder}" / "stage2-mix-beta=0.5" / "model"
        )
        present = [name for name in ENCODER_ARMS if getattr(config, f"{name}_config") is not None]
        assert present == [encoder] and config.num_image_tokens == 95
    config = SphinxConfig.from_pretrained(out / "ablations" / "global-view" / "stage2-mix-beta=0.5" / "model")
    assert config.crop_grid == 1 and config.num_views == 1


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
    assert [line for line in lines if line.startswith("## ")] == [f"## {ablation}" for ablation in ARMS]
    assert sum(line.startswith("| all tasks") or line.startswith("| each task") for line in lines) == 3
    verdicts = [line for line in lines if ", average of the cells, " in line]
    assert len(verdicts) == 2 + 2 + 3 + 1
    assert (
        f"scales: visual tokens per image, {WITH_SUB_IMAGES} 95, {GLOBAL_ONLY} 19; same steps, batch and data" in lines
    )
    assert lines[-1].startswith("tables, plots and results: ")
    assert (out / "ablations" / "report.md").read_text() == "\n".join(lines[:-1]) + "\n"
    bars = [line for line in errors.replace("\r", "\n").splitlines() if line.strip()]
    assert all(line.startswith(("ablation arms, 2 at a time", "stage 2", "eval, ")) for line in bars), bars[:5]
    assert "stage 2 (CLIP-style ViT alone)" in (out / "ablations" / "logs" / "encoder-clip.log").read_text()
    for name in ("weights.png", "weights_curve.png", "tasks.png", "visual_embeddings.png", "scales.png"):
        plot = Image.open(out / "ablations" / name)
        colours = np.unique(np.asarray(plot.convert("RGB")).reshape(-1, 3), axis=0)
        assert plot.width > 500 and len(colours) > 10, name  # drawn, not blank


def test_each_verdict_follows_its_numbers(ablated):
    _, results, _, _, _ = ablated
    found = json.loads(json.dumps(results))
    better, worse = {"difference": 0.04, "low": 0.01, "high": 0.07}, {"difference": -0.04, "low": -0.07, "high": -0.01}
    pairs = list(found["tasks"]["comparisons"])
    found["tasks"]["comparisons"] = {pairs[0]: better, pairs[1]: worse}
    best = found["visual embeddings"]["best single encoder"]
    found["visual embeddings"]["comparisons"] = {f"{THREE_ENCODERS} - {best}": better}
    found["weights"]["comparisons"] = {next(iter(found["weights"]["comparisons"])): worse}
    found["scales"]["comparisons"] = {
        f"{WITH_SUB_IMAGES} - {GLOBAL_ONLY}": {"difference": 0.01, "low": -0.02, "high": 0.04}
    }
    lines = [line for line in format_ablations(found).splitlines() if ", average of the cells, " in line]
    assert lines[0].endswith("worse: the paper's direction (the mix >= this parent) does not hold here")
    assert lines[1].endswith("+0.040 (95 % interval +0.010 to +0.070): better: the paper's direction "
                             "(multi-task >= single-task) holds")  # fmt: skip
    assert lines[2].endswith("worse: the paper's direction (task-specific instructions >= one generic "
                             "instruction) does not hold here")  # fmt: skip
    assert lines[3].endswith("(three encoders >= the best single encoder) holds")
    assert lines[4].endswith("+0.010 (95 % interval -0.020 to +0.040): no difference is resolved at this size")


def test_a_folder_of_another_budget_or_seed_is_not_reused(ablated, capsys):
    out, _, _, _, _ = ablated
    assert main(["demo", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "holds the stages of a run with train_images 64 (now " in error and "pass --force" in error
    assert main(["demo", "--quick", "--ablations", "--seed", "1", "--out", str(out)]) == 2  # the old spelling
    assert "seed 0 (now 1)" in capsys.readouterr().err
    assert main(["demo", "ablations", "--quick", "--seed", "1", "--out", str(out)]) == 2
    assert "seed 0 (now 1)" in capsys.readouterr().err
