"""The miniature demo: `sphinx-mllm demo --quick` learns, is deterministic and reuses its stages."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from modeling_sphinx.cli import main
from modeling_sphinx.miniature.world import DOT, HEIGHT, WIDTH, render

pytestmark = pytest.mark.slow


def _losses(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_generated_world_is_deterministic_and_in_two_domains():
    real, shapes, dot = render(7, "real")
    again, shapes_again, _ = render(7, "real")
    synthetic, _, _ = render(7, "synthetic")
    assert (
        real.size == (WIDTH, HEIGHT) and np.array_equal(np.asarray(real), np.asarray(again)) and shapes == shapes_again
    )

    def colours(image):
        return len(np.unique(np.asarray(image).reshape(-1, 3), axis=0))

    assert colours(synthetic) < colours(real) / 10  # flat versus textured
    assert 1 <= len(shapes) <= 2 and dot["box"][2] - dot["box"][0] == DOT


STAGES = ("stage1-real", "stage1-synthetic", "stage2-mix-beta=0.5")


def test_quick_demo_learns_is_deterministic_and_reuses_stages(quick_demo, tmp_path):
    out, printed, _ = quick_demo
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "mix beta=0.5 + stage 2"
    for stage in STAGES:  # training lowers the loss
        losses = _losses(out / stage)
        assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, stage
    cells = results["scores"]  # every cell holds all held-out questions of its domain
    assert [cells[c]["questions"] for c in ("VQA real", "grounding real")] == [16, 8]
    assert all(c["low"] <= c["score"] <= c["high"] for c in cells.values())
    by_type = results["by question type"]
    assert list(by_type) == [
        f"{kind} {d}" for d in ("real", "synthetic") for kind in ("shape colour", "dot colour", "grounding")
    ]
    assert by_type["grounding real"] == cells["grounding real"] and by_type["dot colour real"]["questions"] == 8
    shares = [by_type[f"{kind} real"]["score"] for kind in ("shape colour", "dot colour")]
    assert sum(shares) / 2 == pytest.approx(cells["VQA real"]["score"])  # the two types split VQA evenly
    card = ModelCard.load(out / "best" / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == {"vqa", "grounding"}
    assert all(r.task_name == r.metric_type for r in card.data.eval_results)  # each result under its own task
    assert len(card.data.eval_results) == 4
    drawn = sorted(out.glob("example_*.png"))
    assert len(drawn) == 3 and Image.open(drawn[0]).size == (WIDTH, HEIGHT)

    stage1 = out / "stage1-real" / "model" / "model.safetensors"
    before = stage1.stat().st_mtime_ns
    assert main(["demo", "--quick", "--out", str(out)]) == 0  # reuses every finished stage
    assert stage1.stat().st_mtime_ns == before
    assert json.loads((out / "results.json").read_text()) == results

    other = tmp_path / "again"
    assert main(["demo", "--quick", "--out", str(other)]) == 0  # a second run from scratch, same seed
    assert json.loads((other / "results.json").read_text()) == results


def test_the_schedule_is_the_papers_on_one_line(quick_demo):
    """Stage 1 on the real-like captions from the parts; its copy continued on the synthetic captions; the mix of
    the two by the paper's formula; stage 2 on every task from the mix."""
    import yaml

    from modeling_sphinx.miniature.recipe import QUICK_BUDGET, TASK_WEIGHTS

    out, _, _ = quick_demo
    starts = {stage: json.loads((out / stage / "stage.json").read_text())["start"] for stage in STAGES}
    assert starts == {
        "stage1-real": "init",
        "stage1-synthetic": "stage1-real/model",
        "stage2-mix-beta=0.5": "mix-beta=0.5",
    }
    for leg, domain in (("stage1-real", "real"), ("stage1-synthetic", "synthetic")):
        sources = yaml.safe_load((out / f"{leg}.yaml").read_text())["sources"]
        assert [(s["task"], Path(s["path"]).parent.name.split("-")[0]) for s in sources] == [("conversations", domain)]
    mix = yaml.safe_load((out / "mix-beta=0.5.yaml").read_text())
    assert [m["parameters"]["weight"] for m in mix["models"]] == [0.5, 0.5]
    assert [Path(m["model"]).parent.name for m in mix["models"]] == ["stage1-real", "stage1-synthetic"]
    tasks = {s["task"] for s in yaml.safe_load((out / "stage2-mix-beta=0.5.yaml").read_text())["sources"]}
    assert tasks == set(TASK_WEIGHTS)
    for stage, steps in zip(STAGES, (QUICK_BUDGET.caption_steps,) * 2 + (QUICK_BUDGET.task_steps,), strict=True):
        assert json.loads((out / stage / "trainer_state.json").read_text())["global_step"] == steps


def test_the_mix_is_the_papers_formula_over_what_stage_1_trained(quick_demo):
    from safetensors.torch import load_file

    out, _, _ = quick_demo
    real, synthetic, mixed = (
        load_file(out / folder / "model.safetensors")
        for folder in ("stage1-real/model", "stage1-synthetic/model", "mix-beta=0.5")
    )
    trained = [key for key in real if not torch.equal(real[key], synthetic[key])]
    assert any(k.startswith("model.visual_proj.") for k in trained) and "lm_head.weight" in trained
    assert all(k.startswith(("model.language_model.", "lm_head.", "model.visual_proj.", "model.start_img",
                             "model.end_img")) for k in trained)  # fmt: skip
    for key in real:
        torch.testing.assert_close(mixed[key], 0.5 * real[key] + 0.5 * synthetic[key])


def test_the_report_decides_each_claim_from_its_numbers():
    from modeling_sphinx.miniature.demo import format_report

    def cell(score, questions=400):
        return {"score": score, "low": score - 0.05, "high": score + 0.05, "questions": questions}

    scores = {f"{m} {d}": cell(0.95) for d in ("real", "synthetic") for m in ("VQA", "grounding")}
    by_type = {f"{k} {d}": cell(0.9, 200) for d in ("real", "synthetic") for k in ("shape colour", "dot colour")}
    examples = [{"expression": "the red circle", "answer": "[0.1,0.2,0.3,0.4]", "iou": iou, "drawing": f"{i}.png"}
                for i, iou in enumerate((0.7, 0.2, 0.5))]  # fmt: skip
    results = {"model": "m", "scores": {**scores, "average": cell(0.95)}, "by question type": by_type,
               "examples": examples}  # fmt: skip
    report = format_report(results).splitlines()
    assert report[0] == "'the red circle': '[0.1,0.2,0.3,0.4]', IoU 0.700 with the true box (hit) -> 0.png"
    assert report[1].endswith("(miss) -> 1.png") and report[2].endswith("(hit) -> 2.png")
    assert report[5].startswith("| m | 0.95 (0.90-1.00)") and "(95 % intervals; 400 held-out questions" in report[6]
    assert report[7:11] == ["| question | real | synthetic |", "|---|---|---|",
                            "| shape colour | 0.90 (0.85-0.95, 200) | 0.90 (0.85-0.95, 200) |",
                            "| dot colour | 0.90 (0.85-0.95, 200) | 0.90 (0.85-0.95, 200) |"]  # fmt: skip
    assert report[12] == "VQA >= 0.9 on both domains: real 0.95, synthetic 0.95: met"
    assert report[14] == "drawn answers: 2 of 3 hit (IoU >= 0.5)"
    results["scores"]["grounding synthetic"]["score"] = 0.59
    assert format_report(results).splitlines()[13] == (
        "grounding >= 0.6 on both domains: real 0.95, synthetic 0.59: not met"
    )


def test_demo_cards_state_the_miniature_and_record_no_path(quick_demo):
    from modeling_sphinx import SphinxConfig

    out, _, _ = quick_demo
    config = SphinxConfig.from_pretrained(out / "best")
    text = (out / "best" / "README.md").read_text()
    assert config.num_image_tokens == 95 and config.num_views == 5  # 2 x 2 crops of 112 px in 28-px patches
    assert f"{config.num_image_tokens} visual tokens per image, {config.tokens_per_view} per view" in text
    assert f"{config.num_views} views" in text and f"{config.patch_size}-px patches" in text
    hidden, layers = config.text_config.hidden_size, config.text_config.num_hidden_layers
    assert f"{layers} layers of width {hidden}" in text
    assert f"(feature width {config.clip_config.model_args['embed_dim']})" in text
    assert "not the release itself" in text and not text.split("\n# ")[1].startswith(config.variant)
    cards = sorted(out.rglob("README.md"))
    assert len(cards) >= 6  # init, the two stage-1 models, the mix, the stage-2 model, best
    for card in cards:
        written = card.read_text()
        assert str(out) not in written and "/tmp" not in written and "/work" not in written, card


def test_the_console_shows_the_stages_bars_the_examples_and_the_tables(quick_demo):
    out, printed, errors = quick_demo
    stages = {"stage 1, real-like captions", "stage 1, continued on synthetic", "stage 2 from mix beta=0.5", "eval"}
    bar_lines = [line for line in errors.replace("\r", "\n").splitlines() if line.strip()]
    unexpected = [line for line in bar_lines if not line.startswith(tuple(f"{s}:" for s in stages))]
    assert not unexpected, unexpected[:5]
    assert {line.split(":")[0] for line in bar_lines} == stages
    lines = printed.splitlines()
    examples = [line for line in lines if "with the true box" in line]
    tables = [line for line in lines if line.startswith("|")]
    claims = [line for line in lines if line.startswith(("VQA >= ", "grounding >= ", "drawn answers: "))]
    assert len(examples) == 3 and len(tables) == (2 + 1) + (2 + 3) and len(claims) == 3
    assert lines[3 + 3].startswith("(95 % intervals; 8 to 16 held-out questions per cell)")
    assert lines[-2].startswith("drawn answers: ") and lines[-1].startswith("the model, with the table")
    assert len(lines) == len(examples) + len(tables) + 2 + len(claims) + 1
