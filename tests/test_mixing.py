import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import pipeline

from modeling_sphinx.cli import main
from modeling_sphinx.folder.create import init_model
from modeling_sphinx.folder.shards import LazyCheckpoint
from modeling_sphinx.mixing import (
    METHODS,
    BaseRole,
    Combine,
    Consensus,
    Recipe,
    RecipeError,
    Sparsify,
    Weighting,
    mix,
    mix_tensor,
    resolve_value,
)

from .helpers import IMAGES, image_message

LLM_KEY = "model.language_model.layers.0.self_attn.q_proj.weight"
VISION_KEY = "model.clip.blocks.0.attn.qkv.weight"


def tensors(folder):
    checkpoint = LazyCheckpoint(folder)
    return {key: checkpoint.get(key) for key in checkpoint.tensor_names()}


def test_linear_is_the_float32_formula_and_only_mixes_the_llm(trio, tmp_path):
    a, b, _ = trio
    recipe = {
        "merge_method": "linear",
        "base_model": str(a),
        "models": [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}],
    }
    out = tensors(mix(recipe, tmp_path / "out"))
    ta, tb = tensors(a), tensors(b)
    assert set(out) == set(ta)  # nothing dropped
    expected = ((0.3 * ta[LLM_KEY].float() + 0.7 * tb[LLM_KEY].float()) / (0.3 + 0.7)).to(torch.bfloat16)
    assert torch.equal(out[LLM_KEY], expected)
    for key in ta:
        if not key.startswith(("model.language_model.", "lm_head.")):
            assert torch.equal(out[key], ta[key]), key


@pytest.mark.parametrize("weights,source", [((1.0, 0.0), 0), ((0.0, 1.0), 1)])
def test_linear_with_one_weight_returns_that_model_bit_for_bit(trio, tmp_path, weights, source):
    a, b, _ = trio
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": weights[0]}},
            {"model": str(b), "parameters": {"weight": weights[1]}},
        ],
        "mixed_tensors": [".*"],
    }
    out = tensors(mix(recipe, tmp_path / "out"))
    chosen = tensors((a, b)[source])
    assert all(torch.equal(out[k], chosen[k]) for k in chosen)


def _slerp_reference(t, v0, v1):
    n0, n1 = v0 / v0.norm(), v1 / v1.norm()
    omega = torch.arccos((n0 * n1).sum().clamp(-1, 1))
    return (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)


@pytest.mark.parametrize("t", [0.0, 0.5, 1.0])
def test_slerp(trio, tmp_path, t):
    a, b, _ = trio
    recipe = {
        "merge_method": "slerp",
        "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": t},
        "out_dtype": "float32",
    }
    out = tensors(mix(recipe, tmp_path / "out"))
    v0, v1 = tensors(a)[LLM_KEY].float(), tensors(b)[LLM_KEY].float()
    if t == 0.0:
        assert torch.equal(out[LLM_KEY], v0)
    elif t == 1.0:
        assert torch.equal(out[LLM_KEY], v1)
    else:
        assert torch.allclose(out[LLM_KEY], _slerp_reference(t, v0, v1), atol=1e-6)


def _ties_reference(base, models, weights, density):
    deltas = []
    for m in models:
        d = m - base
        k = int(density * d.numel())
        threshold = d.abs().flatten().sort(descending=True).values[k - 1]
        deltas.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    stacked = torch.stack(deltas)
    w = torch.tensor(weights).view(-1, *[1] * base.ndim)
    sign = torch.sign((w * stacked).sum(0))
    agree = (torch.sign(stacked) == sign).float()
    mixed = (w * stacked * agree).sum(0)
    divisor = (w * agree).sum(0)
    divisor[divisor.abs() < 1e-8] = 1
    return base + mixed / divisor


def test_ties_matches_reference(trio, tmp_path):
    a, b, c = trio
    recipe = {
        "merge_method": "ties",
        "base_model": str(a),
        "models": [
            {"model": str(b), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(c), "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "out_dtype": "float32",
    }
    out = tensors(mix(recipe, tmp_path / "out"))
    ta, tb, tc = (tensors(x) for x in trio)
    expected = _ties_reference(ta[LLM_KEY].float(), [tb[LLM_KEY].float(), tc[LLM_KEY].float()], [0.6, 0.4], 0.5)
    assert torch.allclose(out[LLM_KEY], expected, atol=1e-6)
    assert torch.equal(out[VISION_KEY], ta[VISION_KEY].float())


def test_dare_is_seeded_and_matches_reference(trio, tmp_path):
    a, b, c = trio
    recipe = {
        "merge_method": "dare_linear",
        "base_model": str(a),
        "models": [{"model": str(b), "parameters": {"weight": 1.0, "density": 0.3}}],
        "parameters": {"normalize": False},
        "random_seed": 7,
        "out_dtype": "float32",
    }
    first = tensors(mix(recipe, tmp_path / "one"))
    second = tensors(mix(recipe, tmp_path / "two"))
    assert torch.equal(first[LLM_KEY], second[LLM_KEY])
    base, other = tensors(a)[LLM_KEY].float(), tensors(b)[LLM_KEY].float()
    delta = other - base
    kept = first[LLM_KEY] != base
    # survivors are rescaled by 1/density, the rest fall back to the base
    assert torch.allclose(first[LLM_KEY][kept], (base + delta / 0.3)[kept], atol=1e-5)
    assert 0.2 < kept.float().mean() < 0.4
    reseeded = tensors(mix({**recipe, "random_seed": 8}, tmp_path / "three"))
    assert not torch.equal(first[LLM_KEY], reseeded[LLM_KEY])


def test_gradients_and_filters():
    assert resolve_value([0.0, 1.0], "model.language_model.layers.0.mlp.up_proj.weight", 3) == 0.0
    assert resolve_value([0.0, 1.0], "model.language_model.layers.1.mlp.up_proj.weight", 3) == 0.5
    assert resolve_value([0.0, 1.0], "lm_head.weight", 3) == 1.0
    value = [{"filter": "self_attn", "value": 0.2}, {"value": 0.9}]
    assert resolve_value(value, "model.language_model.layers.0.self_attn.q_proj.weight", 2) == 0.2
    assert resolve_value(value, "model.language_model.layers.0.mlp.up_proj.weight", 2) == 0.9


def test_mixed_model_loads_and_runs_in_the_pipeline(trio, tmp_path):
    a, b, _ = trio
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(a),
                "models": [{"model": str(b), "parameters": {"weight": 0.5}}],
            }
        )
    )
    assert main(["mix", str(recipe), str(tmp_path / "out")]) == 0
    assert "merge_method: task_arithmetic" in (tmp_path / "out" / "README.md").read_text()
    pipe = pipeline("image-text-to-text", model=str(tmp_path / "out"))
    reply = pipe(text=image_message("Hi", path=IMAGES / "coffee.png"), max_new_tokens=2)
    assert isinstance(reply[0]["generated_text"][-1]["content"], str)


def _bad(recipe_update, trio, tmp_path, message):
    a, b, _ = trio
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
    }
    recipe.update(recipe_update(a, b) if callable(recipe_update) else recipe_update)
    with pytest.raises(RecipeError, match=message):
        mix(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_bad_recipes(trio, tmp_path):
    _bad({"merge_method": "tie"}, trio, tmp_path, "unknown merge_method 'tie' \\(did you mean 'ties'\\?\\)")
    _bad({"parameter": {}}, trio, tmp_path, "unknown recipe key 'parameter' \\(did you mean 'parameters'\\?\\)")
    _bad(
        {"parameters": {"normalise": True}}, trio, tmp_path, "unknown parameter 'normalise' .*did you mean 'normalize'"
    )
    _bad(
        lambda a, b: {
            "models": [
                {"model": str(a), "parameters": {"weight": 1.0}},
                {"model": str(b), "parameters": {"weight": -1.0}},
            ]
        },
        trio,
        tmp_path,
        "weights for tensor .* sum to 0",
    )
    _bad({"merge_method": "ties"}, trio, tmp_path, "ties needs a base_model")
    _bad(
        lambda a, b: {"models": [{"model": str(a) + "-missing", "parameters": {"weight": 1}}]},
        trio,
        tmp_path,
        "folder does not exist",
    )


def written_recipe(path: Path, a: Path, b: Path, weight: str) -> Path:
    """A linear recipe whose first weight is `weight` as it is written in the YAML file."""
    text = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: {weight}}}\n"
    path.write_text(text + f"  - model: {b}\n    parameters: {{weight: 0.5}}\n")
    return path


@pytest.mark.parametrize(
    ("written", "read"),
    [("5e-1", 0.5), ('"0.5"', 0.5), ("0.5", 0.5), ("[0.2, 8e-1]", None)],
)
def test_a_weight_yaml_reads_as_a_string_is_the_number_it_spells(trio, tmp_path, written, read):
    """PyYAML reads `5e-1` as the string '5e-1' (YAML 1.1 wants a dot); the recipe means 0.5 and gets it."""
    a, b, _ = trio
    written_recipe(tmp_path / "recipe.yaml", a, b, written)
    recipe = Recipe.load(tmp_path / "recipe.yaml")
    weight = recipe.models[0][1]["weight"]
    assert weight == (read if read is not None else [0.2, 0.8])
    if read is not None:
        out = tensors(mix(recipe, tmp_path / "out"))
        ta, tb = tensors(a), tensors(b)
        expected = ((0.5 * ta[LLM_KEY].float() + 0.5 * tb[LLM_KEY].float()) / 1.0).to(torch.bfloat16)
        assert torch.equal(out[LLM_KEY], expected)


@pytest.mark.parametrize("written", [".nan", ".inf", "-.inf", "nan", "'inf'", "heavy", "true", "{a: 1}"])
def test_a_weight_that_is_not_a_finite_number_is_refused_naming_the_model_and_writes_nothing(trio, tmp_path, written):
    a, b, _ = trio
    written_recipe(tmp_path / "recipe.yaml", a, b, written)
    with pytest.raises(
        RecipeError, match=rf"model {re.escape(str(a))}: parameter 'weight' must be a (finite )?number"
    ):
        mix(tmp_path / "recipe.yaml", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["mix", str(tmp_path / "recipe.yaml"), str(tmp_path / "out")]) == 2


def test_a_switch_must_be_true_or_false(trio, tmp_path):
    _bad({"parameters": {"normalize": "yes please"}}, trio, tmp_path, "parameter 'normalize' is true or false")


def test_non_finite_weights_in_an_input_are_never_written(trio, tmp_path):
    """An input whose tensors hold NaN mixes into NaN: the output is refused, naming the tensor, and nothing stays."""
    a, b, _ = trio
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in a.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    shard = next(name for name in sorted(broken.glob("*.safetensors")) if LLM_KEY in load_file(name))
    weights = load_file(shard)
    weights[LLM_KEY][0, 0] = float("nan")
    save_file(weights, shard, metadata={"format": "pt"})
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(broken), "parameters": {"weight": 0.5}},
            {"model": str(b), "parameters": {"weight": 0.5}},
        ],
    }
    with pytest.raises(ValueError, match=rf"tensor {re.escape(LLM_KEY)} has 1 of \d+ values NaN or infinite"):
        mix(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn])
def test_every_nan_or_infinity_is_found_wherever_it_lies(dtype):
    from modeling_sphinx.folder.shards import refuse_non_finite

    for shape in ((2,), (7,), (64, 1031)):
        refuse_non_finite("fine", torch.randn(shape).to(dtype))
        for value in (float("nan"), float("inf"), -float("inf")):
            for position in (0, 1, -1, shape[-1] // 2):
                tensor = torch.randn(shape)
                tensor.view(-1)[position] = value
                tensor = tensor.to(dtype)
                if torch.isfinite(tensor.float()).all():  # float8 e4m3 has no infinity: it rounds to NaN or max
                    continue
                with pytest.raises(ValueError, match=r"tensor bad has 1 of \d+ values NaN or infinite"):
                    refuse_non_finite("bad", tensor)
    refuse_non_finite("empty", torch.empty(0, 4, dtype=dtype))


def test_the_shard_writer_writes_in_order_and_raises_a_failed_write(tmp_path):
    from safetensors.torch import load_file

    from modeling_sphinx.folder.shards import StreamingShardWriter

    tensors = {f"t{i}": torch.randn(64, 32).to(torch.bfloat16) for i in range(7)}
    layout = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    (tmp_path / "ok").mkdir()
    with StreamingShardWriter(tmp_path / "ok", layout, max_bytes=3 * 64 * 32 * 2) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    read = {}
    for shard in sorted((tmp_path / "ok").glob("model-*.safetensors")):
        read.update(load_file(shard))
    assert len(writer.files) == 3 and (tmp_path / "ok" / "model.safetensors.index.json").is_file()
    assert read.keys() == tensors.keys()
    assert all(torch.equal(read[name], tensor) for name, tensor in tensors.items())

    # a write that fails on the writer's thread (here: no folder to write into) raises in the caller's
    with (
        pytest.raises(FileNotFoundError, match="missing"),
        StreamingShardWriter(tmp_path / "missing", layout, max_bytes=10**9) as writer,
    ):
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    assert not writer._thread.is_alive() and writer._handle is None

    # leaving the block with an error of the caller's stops the thread without finishing the files
    (tmp_path / "stopped").mkdir()
    with (
        pytest.raises(RuntimeError, match="caller"),
        StreamingShardWriter(tmp_path / "stopped", layout, max_bytes=3 * 64 * 32 * 2) as writer,
    ):
        writer.write("t0", tensors["t0"])
        raise RuntimeError("the caller failed")
    assert not writer._thread.is_alive() and not (tmp_path / "stopped" / "model.safetensors.index.json").exists()


def test_incompatible_checkpoints(trio, tmp_path):
    a, _, _ = trio
    other_arch = init_model("sphinx-1k", tmp_path / "other", tiny=True)
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 1}},
            {"model": str(other_arch), "parameters": {"weight": 1}},
        ],
    }
    with pytest.raises(RecipeError, match=f"model {other_arch}: image_size differs"):
        mix(recipe, tmp_path / "out")

    vocab = init_model("sphinx", tmp_path / "vocab", tiny=True, text_config={"vocab_size": 600})
    recipe["models"][1]["model"] = str(vocab)
    with pytest.raises(RecipeError, match="vocabulary size is 600"):
        mix(recipe, tmp_path / "out")

    missing = tmp_path / "missing"
    missing.mkdir()
    for path in a.iterdir():
        missing.joinpath(path.name).write_bytes(path.read_bytes())
    index_files = sorted(missing.glob("model-*.safetensors"))
    first = load_file(index_files[0])
    dropped = sorted(first)[0]
    del first[dropped]
    from safetensors.torch import save_file

    save_file(first, index_files[0], metadata={"format": "pt"})
    recipe["models"][1]["model"] = str(missing)
    with pytest.raises(RecipeError, match=f"model {missing}: tensors differ .*missing \\['{dropped}'\\]"):
        mix(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


TASK_VECTOR_METHODS = [name for name, method in METHODS.items() if method.combine is Combine.TASK_VECTORS]


def _mix_one_tensor(name, base, models, overrides):
    """`mix_tensor` with the method's defaults, and `overrides` for the parameters the method takes."""
    defaults = METHODS[name].parameter_defaults
    params = {**defaults, **{key: value for key, value in overrides.items() if key in defaults}}
    return mix_tensor(Recipe(name, models=[]), "weight", base, models, [params] * len(models))


WEIGHTED_TASK_VECTOR_METHODS = [
    name
    for name in TASK_VECTOR_METHODS
    if METHODS[name].weighting is Weighting.GIVEN and "weight" in METHODS[name].parameters
]


@pytest.mark.parametrize("consensus", [Consensus.ALL, Consensus.SIGN])
@pytest.mark.parametrize("name", WEIGHTED_TASK_VECTOR_METHODS)
def test_sign_election_follows_the_record(monkeypatch, name, consensus):
    monkeypatch.setitem(METHODS, name, replace(METHODS[name], consensus=consensus))
    base = torch.zeros(8)
    up, down = torch.ones(8), torch.full((8,), -3.0)  # conflicting task vectors: the elected sign is negative
    everything = {"weight": 1.0, "density": 1.0, "gamma": 0.0, "normalize": True, "lambda": 1.0}
    mixed = _mix_one_tensor(name, base, [up, down], everything)
    # elected: only `down` agrees, divided by its own weight; otherwise the mean of both
    assert torch.equal(mixed, torch.full((8,), -3.0 if consensus is Consensus.SIGN else -1.0))


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
def test_each_method_sparsifies_as_its_record_declares(name):
    generator = torch.Generator().manual_seed(0)
    magnitude = torch.arange(1.0, 1001.0)[torch.randperm(1000, generator=generator)]
    delta = magnitude * torch.where(torch.rand(1000, generator=generator) < 0.5, -1.0, 1.0)
    options = {"weight": 1.0, "density": 0.5, "gamma": 0.1, "normalize": False, "lambda": 1.0, "rescale": False}
    mixed = _mix_one_tensor(name, torch.zeros(1000), [delta], options)
    kept = mixed != 0
    assert torch.equal(mixed[kept], delta[kept])  # survivors are untouched: one model, weight 1, no rescale
    sparsify = METHODS[name].sparsify
    if sparsify in (Sparsify.NONE, Sparsify.TOP_VARIANCE):  # one model varies nowhere: SCE selects by default all
        assert kept.all()
    elif sparsify is Sparsify.TOP_MAGNITUDE:  # the 500 largest
        assert torch.equal(kept, magnitude > 500)
    elif sparsify is Sparsify.BREADCRUMBS:  # the 100 largest dropped, the next 500 kept
        assert torch.equal(kept, (magnitude > 400) & (magnitude <= 900))
    else:
        assert sparsify.random
        assert 0.4 < kept.float().mean() < 0.6
        assert kept[magnitude <= 100].any() and not kept[magnitude > 900].all()  # random, not by magnitude
        large, small = kept[magnitude > 500].float().mean(), kept[magnitude <= 500].float().mean()
        if sparsify is Sparsify.MAGPRUNE:  # keep probabilities 0.35 to 0.65 by magnitude rank
            assert large - small > 0.08
        else:
            assert abs(large - small) < 0.08


@pytest.mark.parametrize("name", list(METHODS))
def test_a_base_model_is_required_where_the_record_makes_it_the_origin(name):
    recipe = {"merge_method": name, "models": [{"model": "a"}, {"model": "b"}]}
    if METHODS[name].base_role is BaseRole.ORIGIN:
        with pytest.raises(RecipeError, match=f"merge_method {name} needs a base_model"):
            Recipe.load(recipe)
    else:
        assert Recipe.load(recipe).base_model is None


@pytest.mark.parametrize("base_role", list(BaseRole))
def test_the_base_is_mixed_as_a_model_only_where_the_record_says_so(trio, tmp_path, monkeypatch, base_role):
    monkeypatch.setitem(METHODS, "linear", replace(METHODS["linear"], base_role=base_role))
    a, b, _ = trio
    recipe = {
        "merge_method": "linear",
        "base_model": str(a),
        "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
        "out_dtype": "float32",
    }
    out = tensors(mix(recipe, tmp_path / "out"))[LLM_KEY]
    ta, tb = tensors(a)[LLM_KEY].float(), tensors(b)[LLM_KEY].float()
    if base_role is BaseRole.LISTED_MODEL:
        assert torch.equal(out, (0.5 * ta + 0.5 * tb) / 1.0)
    else:  # the origin is no participant: b alone, normalised by its own weight
        assert torch.equal(out, tb)


def _card_recipe(folder):
    return yaml.safe_load(ModelCard.load(folder / "README.md").data.to_dict()["sphinx_mllm"]["recipe"])


def test_the_card_names_models_by_folder_never_by_path(trio, tmp_path):
    a, b, _ = trio
    by_absolute_path = {
        "merge_method": "linear",
        "base_model": str(a),
        "models": [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}],
    }
    absolute = mix(by_absolute_path, tmp_path / "absolute")
    readme = (absolute / "README.md").read_text()
    assert str(a.parent) not in readme and str(tmp_path) not in readme
    assert not [word for word in re.findall(r"(?<![\w.-])/[^\s'\"`,)\]]+", readme) if Path(word).exists()]
    assert _card_recipe(absolute) == {
        **by_absolute_path,
        "base_model": a.name,
        "models": [{"model": a.name, "parameters": {"weight": 0.3}}, {"model": b.name, "parameters": {"weight": 0.7}}],
    }

    by_relative_path = tmp_path / "recipe.yaml"
    relative_models = [
        {**entry, "model": os.path.relpath(entry["model"], tmp_path)} for entry in by_absolute_path["models"]
    ]
    by_relative_path.write_text(
        yaml.safe_dump({**by_absolute_path, "base_model": os.path.relpath(a, tmp_path), "models": relative_models})
    )
    relative = mix(by_relative_path, tmp_path / "relative")
    assert _card_recipe(relative) == _card_recipe(absolute)
    mixed, reference = tensors(absolute), tensors(relative)
    assert all(torch.equal(mixed[key], reference[key]) for key in reference)
    ta, tb = tensors(a)[LLM_KEY].float(), tensors(b)[LLM_KEY].float()
    assert torch.equal(mixed[LLM_KEY], ((0.3 * ta + 0.7 * tb) / (0.3 + 0.7)).to(torch.bfloat16))
