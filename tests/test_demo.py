"""The miniature demo (issue 11): `sphinx-mllm demo --quick` learns, is deterministic and reuses its stages."""

import json

import numpy as np
from huggingface_hub import ModelCard
from PIL import Image

from modeling_sphinx.cli import main
from modeling_sphinx.world import HEIGHT, WIDTH, render


def _average(scores):
    return sum(scores.values()) / len(scores)


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


def test_quick_demo_learns_is_deterministic_and_reuses_stages(quick_demo, tmp_path):
    out, printed, _ = quick_demo
    assert "| tuned mix |" in printed and "| untrained |" in printed
    table = json.loads((out / "results.json").read_text())
    assert set(table) == {
        "untrained", "stage-1 base", "stage-1 real", "stage-1 synthetic", "mix beta=0.5", "tuned mix"
    }  # fmt: skip
    for stage in ("stage1-base", "stage2"):  # training lowers the loss
        losses = _losses(out / stage)
        assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, stage
    for stage in ("stage1-real", "stage1-synthetic"):  # tuned from a base already trained on both domains
        losses = _losses(out / stage)
        assert sum(losses[-2:]) / 2 < 1.02 * sum(losses[:2]) / 2, stage
    trained = max(_average(scores) for name, scores in table.items() if name != "untrained")
    assert trained > _average(table["untrained"])  # held-out images of both domains
    card = ModelCard.load(out / "best" / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == {"vqa", "grounding"}
    drawn = sorted(out.glob("example_*.png"))
    assert len(drawn) == 3 and Image.open(drawn[0]).size == (WIDTH, HEIGHT)

    stage1 = out / "stage1-real" / "model" / "model.safetensors"
    before = stage1.stat().st_mtime_ns
    assert main(["demo", "--quick", "--out", str(out)]) == 0  # reuses every finished stage
    assert stage1.stat().st_mtime_ns == before
    assert json.loads((out / "results.json").read_text()) == table

    other = tmp_path / "again"
    assert main(["demo", "--quick", "--out", str(other)]) == 0  # a second run from scratch, same seed
    assert json.loads((other / "results.json").read_text()) == table


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
    assert len(cards) >= 7  # init, the three stage-1 models, the mix, stage 2, best
    for card in cards:
        written = card.read_text()
        assert str(out) not in written and "/tmp" not in written and "/work" not in written, card


# what the test extra's bitsandbytes logs when it is imported on a CPU without its optional kernels package; the
# demo's own install (the README's first command) has no bitsandbytes
THIRD_PARTY_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def test_the_console_shows_the_stages_bars_the_examples_and_the_table(quick_demo):
    out, printed, errors = quick_demo
    stages = {"stage 1, shared base", "stage 1, real domain", "stage 1, synthetic domain", "stage 2"}
    bar_lines = [line for line in errors.replace("\r", "\n").splitlines() if line.strip()]
    unexpected = [
        line
        for line in bar_lines
        if not line.startswith(tuple(f"{s}:" for s in stages)) and THIRD_PARTY_NOTICE not in line
    ]
    assert not unexpected, unexpected[:5]
    assert {line.split(":")[0] for line in bar_lines if THIRD_PARTY_NOTICE not in line} == stages
    lines = printed.splitlines()
    examples = [line for line in lines if "with the true box" in line]
    table = [line for line in lines if line.startswith("|")]
    assert len(examples) == 3 and len(table) == 2 + 6
    assert len(lines) == len(examples) + len(table) + 1 and lines[-1].startswith("best model, with the table")
