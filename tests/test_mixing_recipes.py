"""The recipe features of `sphinx-mllm mix` beyond one method: per-part settings, text-only LLaMA and Mixtral donors,
and recipes of stages."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from modeling_sphinx.cli import main
from modeling_sphinx.folder.create import init_model
from modeling_sphinx.folder.shards import LazyCheckpoint
from modeling_sphinx.mixing import PARTS, RecipeError, mix

LLM_KEY = "model.language_model.layers.1.mlp.down_proj.weight"
EMBED = "model.language_model.embed_tokens.weight"


def tensors(folder) -> dict[str, torch.Tensor]:
    checkpoint = LazyCheckpoint(folder)
    return {name: checkpoint.get(name).float() for name in checkpoint.tensor_names()}


def of_part(weights: dict, part: str) -> dict:
    return {name: value for name, value in weights.items() if re.search(PARTS[part], name)}


def linear(*models, **extra) -> dict:
    entries = [{"model": str(model), "parameters": {"weight": 0.5}} for model in models]
    return {"merge_method": "linear", "models": entries, "out_dtype": "float32", **extra}


def text_only(sphinx: Path, out: Path, vocabulary=None, drop: str | None = None, config: dict | None = None) -> Path:
    """The LLM of a SPHINX folder as a plain LLaMA/Mixtral folder: `model.X` names, no `<image>` row (or
    `vocabulary` rows), without the tensors matching `drop`, `config` changed."""
    sphinx_config = json.loads((sphinx / "config.json").read_text())
    image_token = sphinx_config["image_token_id"]
    weights = {}
    for name, tensor in tensors(sphinx).items():
        if not name.startswith(("model.language_model.", "lm_head.")) or (drop and re.search(drop, name)):
            continue
        if name in (EMBED, "lm_head.weight"):
            tensor = tensor[: vocabulary or image_token]
        weights[name.replace("model.language_model.", "model.")] = tensor.to(torch.bfloat16).contiguous()
    out.mkdir()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    text = {**sphinx_config["text_config"], "vocab_size": vocabulary or image_token, **(config or {})}
    (out / "config.json").write_text(json.dumps(text))
    shutil.copy(sphinx / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def donor(trio, tmp_path_factory):
    return text_only(trio[1], tmp_path_factory.mktemp("donor") / "llama")


# ---------------------------------------------------------------------------- parts


def test_one_recipe_mixes_the_llm_and_keeps_the_towers_of_one_model(trio, tmp_path):
    a, b, c = trio
    recipe = linear(a, b) | {
        "parts": {
            "language_model": {"parameters": {"weight": 0.5}},
            "clip": {"from": str(b)},
            "projectors": {
                "parameters": {
                    "weight": [{"filter": "qformer_proj", "value": 1.0}, {"value": 0.5}],
                    "normalize": False,
                }
            },
        }
    }
    recipe["models"][1]["parameters"] = {"weight": 0.9}  # the parts' parameters win where they are set
    out, ta, tb = tensors(mix(recipe, tmp_path / "out")), tensors(a), tensors(b)
    for name in of_part(out, "language_model"):
        assert torch.equal(out[name], (0.5 * ta[name] + 0.5 * tb[name]) / 1.0)
    assert all(torch.equal(out[name], tb[name]) for name in of_part(out, "clip"))
    assert all(torch.equal(out[name], ta[name]) for name in of_part(out, "dinov2"))  # unlisted, unmixed: base
    for name in of_part(out, "projectors"):
        expected = ta[name] + tb[name] if "qformer_proj" in name else 0.5 * ta[name] + 0.5 * tb[name]
        assert torch.equal(out[name], expected)
    assert all(torch.equal(out[name], ta[name]) for name in of_part(out, "image_boundaries"))


def test_a_part_takes_a_gradient_over_the_layers(trio, tmp_path):
    a, b, _ = trio
    recipe = {
        "merge_method": "slerp",
        "base_model": str(a),
        "models": [{"model": str(b)}],
        "parameters": {"t": 0.5},
        "parts": {"language_model": {"parameters": {"t": [0.0, 1.0]}}},  # first layer a, last layer b
        "out_dtype": "float32",
    }
    out, ta, tb = tensors(mix(recipe, tmp_path / "out")), tensors(a), tensors(b)
    first, last = LLM_KEY.replace("layers.1", "layers.0"), LLM_KEY
    assert torch.equal(out[first], ta[first]) and torch.equal(out[last], tb[last])


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"clips": {"from": "A"}}, "parts: unknown part 'clips' \\(did you mean 'clip'\\?\\)"),
        ({"clip": {"from": "A", "parameters": {}}}, "parts: clip: give either parameters .* or from .*, not both"),
        ({"clip": {"from": "elsewhere"}}, "parts: clip: from 'elsewhere' is not the base_model or one of the models"),
        ({"clip": {"form": "A"}}, "parts: clip: unknown key 'form' \\(did you mean 'from'\\?\\)"),
        ({"clip": {"source": "A"}}, "parts: clip: unknown key 'source'"),
        ({"clip": {}}, "parts: clip: give either parameters .* or from .*, not neither"),
        ({"clip": {"parameters": {"wieght": 1}}}, "unknown parameter 'wieght' for linear in part clip"),
        ({"clip": "A"}, "parts: clip: parts maps a part name to"),
        (["clip"], "parts maps a part name to"),
    ],
)
def test_bad_parts_are_one_line_naming_the_part(trio, tmp_path, parts, message):
    a, b, _ = trio
    parts = yaml.safe_load(yaml.safe_dump(parts).replace("A", str(a)))
    with pytest.raises(RecipeError, match=message) as error:
        mix(linear(a, b) | {"parts": parts}, tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- text-only donors


def test_a_text_only_llama_mixes_into_the_language_model(trio, donor, tmp_path):
    a, b, _ = trio
    out, ta, tb = tensors(mix(linear(a, donor), tmp_path / "out")), tensors(a), tensors(b)
    image_token = json.loads((a / "config.json").read_text())["image_token_id"]
    for name in of_part(out, "language_model"):
        expected = (0.5 * ta[name] + 0.5 * tb[name]) / 1.0  # the donor holds b's LLM
        if name in (EMBED, "lm_head.weight"):  # the `<image>` row the donor lacks is the base's
            expected[image_token] = ta[name][image_token]
        assert torch.equal(out[name], expected), name
    assert all(torch.equal(out[name], ta[name]) for name in out if not re.search(PARTS["language_model"], name))


def test_a_text_only_llama_can_give_the_whole_language_model(trio, donor, tmp_path):
    a, b, c = trio
    recipe = linear(a, c, donor) | {"parts": {"language_model": {"from": str(donor)}}}
    out, ta, tb = tensors(mix(recipe, tmp_path / "out")), tensors(a), tensors(b)
    image_token = json.loads((a / "config.json").read_text())["image_token_id"]
    assert torch.equal(out[LLM_KEY], tb[LLM_KEY])
    assert torch.equal(out[EMBED][:image_token], tb[EMBED][:image_token])
    assert torch.equal(out[EMBED][image_token], ta[EMBED][image_token])


def test_a_text_only_mixtral_mixes_into_sphinx_moe(tmp_path):
    base = init_model("sphinx-moe", tmp_path / "moe-a", tiny=True, seed=1)
    other = init_model("sphinx-moe", tmp_path / "moe-b", tiny=True, seed=2)
    mixtral = text_only(other, tmp_path / "mixtral")
    assert json.loads((mixtral / "config.json").read_text())["model_type"] == "mixtral"
    out, ta, tb = tensors(mix(linear(base, mixtral), tmp_path / "out")), tensors(base), tensors(other)
    expert = "model.language_model.layers.0.block_sparse_moe.experts.3.w2.weight"
    assert torch.allclose(out[expert], (0.5 * ta[expert] + 0.5 * tb[expert].bfloat16().float()), atol=1e-6)
    llama = text_only(init_model("sphinx", tmp_path / "llama-src", tiny=True), tmp_path / "llama")
    with pytest.raises(RecipeError, match="a text-only llama cannot give a SPHINX language model of type mixtral"):
        mix(linear(base, llama), tmp_path / "refused")


def donor_with(trio, tmp_path, **options) -> Path:
    return text_only(trio[1], tmp_path / "bad-donor", **options)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda trio, tmp: text_only(
                init_model("sphinx", tmp / "w", tiny=True, text_config={"hidden_size": 96}), tmp / "d"
            ),
            r"tensor \S+ has shape \[\d+, 96\], the base's \S+ has \[\d+, 64\]$",
        ),
        (
            lambda trio, tmp: donor_with(trio, tmp, vocabulary=500),
            r"tensor \S+ has shape \[500, 64\], the base's \S+ has \[513, 64\] \(another vocabulary\)",
        ),
        (
            lambda trio, tmp: donor_with(trio, tmp, drop=r"\.layers\.1\."),
            "1 decoder layers, but the base's language model has 2",
        ),
        (
            lambda trio, tmp: donor_with(trio, tmp, drop=r"language_model\.norm\."),
            "lacks norm.weight of the base's LLM",
        ),
    ],
)
def test_a_donor_of_another_shape_is_refused_naming_both_shapes(trio, tmp_path, make, message):
    a = trio[0]
    bad = make(trio, tmp_path)
    with pytest.raises(RecipeError, match=message) as error:
        mix(linear(a, bad), tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_a_donor_cannot_be_the_base_or_give_a_tower(trio, donor, tmp_path, capsys):
    a, b, _ = trio
    with pytest.raises(RecipeError, match="a text-only llama cannot be the first model .*make a SPHINX folder"):
        mix(linear(donor, a), tmp_path / "out")
    with pytest.raises(RecipeError, match="parts: clip: from .*, a text-only LLM, which has no clip"):
        mix(linear(a, donor) | {"parts": {"clip": {"from": str(donor)}}}, tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**linear(a, donor), "base_model": str(donor)}))
    assert main(["mix", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be the base_model" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- stages


def test_stages_equal_the_mixes_run_one_after_the_other(trio, tmp_path):
    a, b, c = trio
    first = linear(a, b)
    second = {
        "merge_method": "task_arithmetic",
        "base_model": str(a),
        "models": [
            {"model": "halfway", "parameters": {"weight": 1.0}},
            {"model": str(c), "parameters": {"weight": 0.5}},
        ],
        "out_dtype": "float32",
    }
    by_hand = tmp_path / "by-hand"
    mix(first, by_hand / "halfway")
    mix(
        {**second, "models": [{**second["models"][0], "model": str(by_hand / "halfway")}, second["models"][1]]},
        by_hand / "final",
    )
    path = tmp_path / "work" / "staged.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"stages": [{"name": "halfway", **first}, {"name": "final", **second}]}))
    assert main(["mix", str(path), str(tmp_path / "work" / "out")]) == 0
    staged, expected = tensors(tmp_path / "work" / "out"), tensors(by_hand / "final")
    assert staged.keys() == expected.keys() and all(torch.equal(staged[k], expected[k]) for k in staged)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["out", "staged.yaml"]  # no intermediate left
    card = ModelCard.load(tmp_path / "work" / "out" / "README.md")
    recipe = yaml.safe_load(card.data.to_dict()["sphinx_mllm"]["recipe"])
    assert [stage["name"] for stage in recipe["stages"]] == ["halfway", "final"]
    assert str(tmp_path) not in card.content and recipe["stages"][1]["base_model"] == a.name


def test_each_intermediate_is_removed_once_no_later_stage_reads_it(trio, tmp_path, caplog):
    a, b, c = trio
    seen = []

    class Intermediates(logging.Handler):  # what is on disk as each stage starts
        def emit(self, record):
            if record.getMessage().startswith("stage "):
                seen.append(sorted(p.name for p in tmp_path.glob(".out.*stages*/*")))

    handler = Intermediates()
    logging.getLogger("modeling_sphinx.mixing").addHandler(handler)
    caplog.set_level(logging.INFO, logger="modeling_sphinx.mixing")
    stages = [
        {"name": "one", **linear(a, b)},
        {"name": "two", **linear(a, "one")},
        {"name": "three", **linear(c, "two")},
    ]
    try:
        mix({"stages": stages}, tmp_path / "out")
    finally:
        logging.getLogger("modeling_sphinx.mixing").removeHandler(handler)
    assert seen == [[], ["one"], ["two"]]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (lambda a, b: [{"name": "x", **linear(a, b)}, {"name": "x", **linear(a, b)}], "name is used twice"),
        (lambda a, b: [linear(a, b)], "stage 1: name must be letters, digits"),
        (lambda a, b: [{"name": "..", **linear(a, b)}], r"stage 1: name must be .*, got '\.\.'"),
        (lambda a, b: [{"name": ["x"], **linear(a, b)}], r"stage 1: name must be .*, got \['x'\]"),
        (
            lambda a, b: [{"name": "x", **linear(a, b)}, {"name": "y", **linear(a, b)}],
            "stage 'x': no later stage reads it",
        ),
        (lambda a, b: [{"name": "x", **linear(a, b), "merge_method": "lienar"}], "stage 'x': unknown merge_method"),
        (
            lambda a, b: [{"name": "x", **linear(a, b)}, {"name": "y", **linear("x", "z")}],
            "stage 'y': model .*z: folder",
        ),
        (lambda a, b: "x", "stages is a list of recipes"),
    ],
)
def test_bad_stages_are_refused_before_any_stage_runs(trio, tmp_path, stages, message):
    with pytest.raises(RecipeError, match=message) as error:
        mix({"stages": stages(*trio[:2])}, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_later_stage_leaves_nothing(trio, tmp_path):
    a, b, _ = trio
    other = init_model("sphinx-1k", tmp_path / "other", tiny=True)
    stages = [{"name": "one", **linear(a, b)}, {"name": "two", **linear("one", other)}]
    with pytest.raises(RecipeError, match="differs from"):
        mix({"stages": stages}, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["other"]
