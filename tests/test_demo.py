"""The miniature demo: `sphinx-mllm demo --quick` learns, is deterministic and reuses its stages."""

import json

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from modeling_sphinx.cli import main
from modeling_sphinx.miniature.world import HEIGHT, WIDTH, render

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
    assert 1 <= len(shapes) <= 2 and dot["box"][2] - dot["box"][0] == 7


TUNED = ("real + stage 2", "synthetic + stage 2", "mix beta=0.5 + stage 2")
STAGE2_FOLDERS = ("stage2-real", "stage2-synthetic", "stage2-mix-beta=0.5")


def test_quick_demo_learns_is_deterministic_and_reuses_stages(quick_demo, tmp_path):
    out, printed, _ = quick_demo
    results = json.loads((out / "results.json").read_text())
    assert tuple(results["models"]) == TUNED and results["best"] in TUNED
    for stage in ("stage1-real", "stage1-synthetic", *STAGE2_FOLDERS):  # training lowers the loss
        losses = _losses(out / stage)
        assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, stage
    for cells in results["models"].values():  # every cell holds all held-out questions of its domain
        assert [cells[c]["questions"] for c in ("VQA real", "grounding real")] == [12, 8]
        assert all(c["low"] <= c["score"] <= c["high"] for c in cells.values())
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


def test_every_stage_2_start_gets_the_same_data_steps_and_settings(quick_demo):
    out, _, _ = quick_demo
    mixtures = {(out / f"{folder}.yaml").read_text() for folder in STAGE2_FOLDERS}
    assert len(mixtures) == 1
    settings = []
    for folder in STAGE2_FOLDERS:
        state = json.loads((out / folder / "trainer_state.json").read_text())
        settings.append((state["max_steps"], state["train_batch_size"], state["global_step"]))
    assert len(set(settings)) == 1
    assert {(out / f"stage1-{d}.yaml").read_text().count("captions.jsonl") for d in ("real", "synthetic")} == {1}


def test_the_report_decides_each_claim_from_its_numbers():
    from modeling_sphinx.miniature.demo import format_report

    def cells(score):
        one = {"score": score, "low": score - 0.05, "high": score + 0.05, "questions": 300}
        named = {f"{m} {d}": dict(one) for d in ("real", "synthetic") for m in ("VQA", "grounding")}
        return {**named, "average": dict(one)}

    results = {
        "models": {"a": cells(0.95), "b": cells(0.5)},
        "best": "a",
        "weight mix": {
            "better": {"difference": 0.04, "low": 0.01, "high": 0.07},
            "worse": {"difference": -0.04, "low": -0.07, "high": -0.01},
            "unresolved": {"difference": 0.01, "low": -0.02, "high": 0.04},
        },
    }
    report = format_report(results).splitlines()
    assert "| a (best) | 0.95 (0.90-1.00)" in report[2] and "(95 % intervals; 300 held-out questions" in report[4]
    assert report[5].endswith(
        "+0.040 (95 % interval +0.010 to +0.070): the mix is better: the paper's direction holds"
    )
    assert report[6].endswith("the mix is worse: the paper's direction does not hold here")
    assert report[7].endswith("no difference is resolved at this size")
    assert report[8] == "best model, VQA >= 0.9: real 0.95, synthetic 0.95: met"
    results["models"]["a"]["grounding synthetic"]["score"] = 0.59
    assert format_report(results).splitlines()[9] == "best model, grounding >= 0.6: real 0.95, synthetic 0.59: not met"


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
    assert len(cards) >= 8  # init, the two stage-1 models, the mix, the three stage-2 models, best
    for card in cards:
        written = card.read_text()
        assert str(out) not in written and "/tmp" not in written and "/work" not in written, card


def test_the_console_shows_the_stages_bars_the_examples_and_the_table(quick_demo):
    out, printed, errors = quick_demo
    stages = {"stage 1, real captions", "stage 1, synthetic captions"}
    stages |= {f"stage 2 from {start}" for start in ("real", "synthetic", "mix beta=0.5")}
    stages |= {f"eval, {name}" for name in TUNED}
    bar_lines = [line for line in errors.replace("\r", "\n").splitlines() if line.strip()]
    unexpected = [line for line in bar_lines if not line.startswith(tuple(f"{s}:" for s in stages))]
    assert not unexpected, unexpected[:5]
    assert {line.split(":")[0] for line in bar_lines} == stages
    lines = printed.splitlines()
    examples = [line for line in lines if "with the true box" in line]
    table = [line for line in lines if line.startswith("|")]
    claims = [line for line in lines if line.startswith(("weight mix, ", "best model, VQA", "best model, grounding"))]
    assert len(examples) == 3 and len(table) == 2 + 3 and len(claims) == 2 + 2
    assert lines[len(examples) + len(table)].startswith("(95 % intervals; 8 to 12 held-out questions per cell)")
    assert len(lines) == len(examples) + len(table) + 1 + len(claims) + 1
    assert lines[-1].startswith("best model, with the table")
