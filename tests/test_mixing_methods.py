"""Each mixing method against a float64 reference written from its definition, on tiny tensors; then every method
as a recipe through `sphinx-mllm mix` on tiny SPHINX folders, and its bad parameters refused in one line."""

from pathlib import Path

import pytest
import torch
import yaml

from modeling_sphinx.cli import main
from modeling_sphinx.folder.shards import LazyCheckpoint
from modeling_sphinx.mixing import METHODS, BaseRole, Recipe, RecipeError, mix, mix_tensor

LLM_KEY = "model.language_model.layers.0.mlp.up_proj.weight"


def mixed(name: str, base, models, with_base: bool = True, per_model: list[dict] | None = None, **overrides):
    """`mix_tensor` in float64 with the method's defaults, `overrides` for every model, `per_model` on top."""
    defaults = METHODS[name].parameter_defaults
    params = [{**defaults, **overrides, **extra} for extra in per_model or [{}] * len(models)]
    recipe = Recipe(name, models=[], base_model=Path("base") if with_base else None)
    return mix_tensor(recipe, "weight", base, models, params, compute=torch.float64)


def random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def slerp(t, v0, v1):
    u0, u1 = v0 / v0.norm(), v1 / v1.norm()
    omega = torch.arccos((u0 * u1).sum().clamp(-1, 1))
    return (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)


def exp_map(point, tangent):
    norm = tangent.norm()
    return point if norm < 1e-15 else torch.cos(norm) * point + torch.sin(norm) * tangent / norm


def log_map(point, target):
    cos = (point * target).sum().clamp(-1, 1)
    theta = torch.arccos(cos)
    along = target - cos * point
    return along * 0 if theta < 1e-15 else theta / torch.sin(theta) * along


def karcher_reference(vectors, steps=200):
    """The point of the unit sphere where the mean of the log maps vanishes, scaled by the mean norm."""
    units = [v / v.norm() for v in vectors]
    mean = sum(units) / sum(units).norm()
    for _ in range(steps):
        mean = exp_map(mean, sum(log_map(mean, u) for u in units) / len(units))
        mean = mean / mean.norm()
    return mean * sum(v.norm() for v in vectors) / len(vectors)


def multislerp_reference(vectors, weights):
    """Project the units onto the tangent plane at their normalised weighted mean, average there, map back."""
    weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    units = [v / v.norm() for v in vectors]
    mean = sum(w * u for w, u in zip(weights, units, strict=True))
    mean = mean / mean.norm()
    tangent = sum(w * (u - (u * mean).sum() * mean) for w, u in zip(weights, units, strict=True))
    return exp_map(mean, tangent) * sum(w * v.norm() for w, v in zip(weights, vectors, strict=True))


def test_karcher_of_two_models_of_one_norm_is_the_slerp_midpoint():
    v0, v1 = random(6, 5, seed=1), random(6, 5, seed=2)
    v1 = v1 * v0.norm() / v1.norm()
    result = mixed("karcher", torch.zeros(6, 5), [v0, v1], with_base=False)
    assert torch.allclose(result, slerp(0.5, v0, v1), atol=1e-12)


def test_karcher_of_three_models_is_the_riemannian_mean():
    vectors = [random(40, seed=seed) for seed in (1, 2, 3)]
    result = mixed("karcher", torch.zeros(40), vectors, with_base=False, max_iter=1000, tol=1e-12)
    assert torch.allclose(result, karcher_reference(vectors), atol=1e-9)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 0.7), (2.0, 1.0, 1.0)])
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_is_the_tangent_space_barycentre(weights, with_base):
    base = random(8, 4, seed=9) if with_base else torch.zeros(8, 4)
    vectors = [random(8, 4, seed=seed) for seed in range(len(weights))]
    result = mixed("multislerp", base, vectors, with_base=with_base, per_model=[{"weight": w} for w in weights])
    expected = base + multislerp_reference([v - base for v in vectors], list(weights))
    assert torch.allclose(result, expected, atol=1e-12)


def test_multislerp_of_two_models_at_equal_weights_is_slerp():
    v0, v1 = random(30, seed=1), random(30, seed=2)
    result = mixed("multislerp", torch.zeros(30), [v0, v1], with_base=False, weight=1.0)
    scale = (v0.norm() + v1.norm()) / 2
    assert torch.allclose(result, slerp(0.5, v0 / v0.norm(), v1 / v1.norm()) * scale, atol=1e-12)


@pytest.mark.parametrize("layout", ["flatten", "rows", "columns"])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_is_slerp_at_the_weights_ratio(layout, with_base):
    base = random(5, 7, seed=9) if with_base else torch.zeros(5, 7)
    v0, v1 = random(5, 7, seed=1), random(5, 7, seed=2)
    switches = {"nuslerp_flatten": layout == "flatten", "nuslerp_row_wise": layout == "columns"}
    per_model = [{"weight": 1.0}, {"weight": 3.0}]  # t = 3 / (1 + 3)
    result = mixed("nuslerp", base, [v0, v1], with_base=with_base, per_model=per_model, **switches)
    d0, d1 = v0 - base, v1 - base
    if layout == "flatten":
        expected = slerp(0.75, d0, d1)
    elif layout == "rows":
        expected = torch.stack([slerp(0.75, a, b) for a, b in zip(d0, d1, strict=True)])
    else:
        expected = torch.stack([slerp(0.75, a, b) for a, b in zip(d0.T, d1.T, strict=True)]).T
    assert torch.allclose(result, base + expected, atol=1e-12)


def test_della_without_dropping_is_its_consensus_form():
    base, models = random(12, 10, seed=0), [random(12, 10, seed=seed) for seed in (1, 2, 3)]
    per_model = [{"weight": w} for w in (0.5, 0.3, 0.2)]
    ties = mixed("ties", base, models, per_model=per_model, density=1.0)
    assert torch.equal(mixed("della", base, models, per_model=per_model, density=1.0), ties)
    arithmetic = mixed("task_arithmetic", base, models, per_model=per_model)
    assert torch.allclose(mixed("della_linear", base, models, per_model=per_model, density=1.0), arithmetic)


def test_della_keeps_entries_by_their_magnitude_rank_and_rescales_by_the_keep_probability():
    # one row of 1000 distinct magnitudes; density 0.5, epsilon 0.4: keep probability 0.1 (smallest) to 0.9
    row = torch.arange(1.0, 1001.0, dtype=torch.float64)[torch.randperm(1000, generator=torch.Generator())]
    result = mixed("della_linear", torch.zeros(1, 1000), [row[None]], density=0.5, epsilon=0.4, weight=1.0)[0]
    kept = result != 0
    probability = 0.1 + 0.8 * (row - 1) / 999  # magnitude rank r of 999 is magnitude r + 1
    assert torch.allclose(result[kept], row[kept] / probability[kept], atol=1e-9)
    assert kept[row > 900].float().mean() > 0.75 and kept[row <= 100].float().mean() < 0.25


def test_breadcrumbs_ties_is_breadcrumbs_masks_with_sign_election():
    base = torch.zeros(100, dtype=torch.float64)
    magnitudes = torch.arange(1.0, 101.0, dtype=torch.float64)
    a = magnitudes * torch.where(torch.arange(100) % 3 == 0, -1.0, 1.0)
    b = -magnitudes.flip(0)
    result = mixed("breadcrumbs_ties", base, [a, b], density=0.5, gamma=0.1, weight=1.0)
    # each keeps the ranks 41..90 of its magnitudes (the 10 largest dropped), then TIES's election, unnormalised
    masked = [v * ((v.abs() > 40) & (v.abs() <= 90)) for v in (a, b)]
    elected = torch.where(masked[0] + masked[1] >= 0, 1.0, -1.0)
    expected = sum(m * (torch.sign(m) == elected) for m in masked)
    assert torch.equal(result, expected)


def test_sce_selects_by_variance_weighs_by_energy_and_elects_signs():
    base = random(20, 10, seed=0)
    models = [random(20, 10, seed=seed) for seed in (1, 2, 3)]
    result = mixed("sce", base, models, select_topk=0.3)
    deltas = torch.stack([m - base for m in models])
    variance = deltas.var(0, correction=0)
    keep = variance >= variance.flatten().sort(descending=True).values[int(0.3 * variance.numel()) - 1]
    deltas = deltas * keep
    energy = deltas.square().mean((1, 2))
    weights = (energy / energy.sum()).view(-1, 1, 1)
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(deltas) == elected
    expected = base + (weights * deltas * agree).sum(0) / (weights * agree).sum(0).clamp(min=1e-6)
    assert torch.allclose(result, expected, atol=1e-12)


def _overlaps():
    base = torch.zeros(8, dtype=torch.float64)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0, 3.0, 0.0, 1e-7, 4.0], dtype=torch.float64)
    b = torch.tensor([3.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, -2.0], dtype=torch.float64)
    return base, a, b


def test_ram_takes_unique_changes_whole_and_averages_shared_ones():
    base, a, b = _overlaps()
    expected = torch.tensor([2.0, 2.0, 0.0, 5.0, 3.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # 1e-7: no change
    assert torch.equal(mixed("ram", base, [a, b]), expected)


def test_ramplus_boosts_each_models_unique_changes_by_its_share_of_shared_ones():
    base, a, b = _overlaps()
    # a: 2 shared (positions 0, 7), 2 unique (1, 4) → ρ = 1, clamped to α 0.2; b: 2 shared, 1 unique → ρ = 2 → 0.2
    boost = 1 + 0.1 * 0.2
    expected = torch.tensor([2.0, 2 * boost, 0.0, 5 * boost, 3 * boost, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(mixed("ramplus_tl", base, [a, b]), expected, atol=1e-15)
    loose = mixed("ramplus_tl", base, [a, b], alpha=1.0)  # ρ 1 for a, 2 clamped to 1 for b
    assert torch.allclose(loose[[1, 3, 4]], torch.tensor([2.0, 5.0, 3.0], dtype=torch.float64) * 1.1, atol=1e-15)


def test_nearswap_moves_the_base_where_the_models_are_close():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    other = torch.tensor([0.05, 1.0, -0.2, 1.0], dtype=torch.float64)
    result = mixed("nearswap", base, [other], t=0.1)
    weight = (0.1 / (other - base).abs().clamp(min=1e-6)).clamp(0, 1)
    assert torch.equal(result, weight * other + (1 - weight) * base)
    assert result[0] == 0.05 and result[3] == 1.0  # closer than t: the other model's value


def test_arcee_fusion_keeps_the_changes_whose_importance_is_an_outlier():
    base = random(16, 32, seed=0)
    other = base + 0.01 * random(16, 32, seed=1)
    other[3, 5] += 4.0  # one change that matters
    result = mixed("arcee_fusion", base, [other])
    p, q = torch.softmax(other, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (other - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    q1, median, q3 = (torch.quantile(importance.flatten(), f, interpolation="lower") for f in (0.25, 0.5, 0.75))
    keep = importance >= median + 1.5 * (q3 - q1)
    assert torch.equal(result, torch.where(keep, other, base))
    assert keep[3, 5] and keep.float().mean() < 0.5


def test_passthrough_is_the_model_scaled():
    model = random(3, 4, seed=1)
    assert torch.equal(mixed("passthrough", torch.zeros(3, 4), [model], with_base=False, scale=0.5), model * 0.5)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_interpolates_by_the_task_vectors_mean_cosine(filter_wise):
    base = random(6, 9, seed=0)
    models = [random(6, 9, seed=seed) for seed in (1, 2, 3)]
    result = mixed("model_stock", base, models, filter_wise=filter_wise)
    deltas = [m - base for m in models]
    dims = -1 if filter_wise else (0, 1)

    def cosine(a, b):
        return (a * b).sum(dims) / (a.square().sum(dims).sqrt() * b.square().sum(dims).sqrt())

    cos = sum(cosine(deltas[i], deltas[j]) for i in range(3) for j in range(i + 1, 3)) / 3
    t = 3 * cos / (1 + 2 * cos)
    t = t.unsqueeze(-1) if filter_wise else t
    assert torch.allclose(result, t * sum(models) / 3 + (1 - t) * base, atol=1e-12)


# ---------------------------------------------------------------------------- every method through the CLI


def recipe_for(name: str, a: Path, b: Path, c: Path) -> dict:
    """A recipe of `name` on the tiny folders: a as base where the method has one, b and c as the models (one of
    them where the method takes one)."""
    method = METHODS[name]
    models = [b] if method.max_models == 1 else [b, c]
    values = {"weight": 0.5, "t": 0.3, "density": 0.6, "select_topk": 0.5}
    parameters = {key: value for key, value in values.items() if key in method.parameters}
    recipe = {"merge_method": name, "models": [{"model": str(m)} for m in models], "parameters": parameters}
    if method.base_role is not BaseRole.LISTED_MODEL or method.max_models == 1:
        recipe["base_model"] = str(a)
    return recipe | {"out_dtype": "float32", "dtype": "float64"}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_mixes_tiny_folders_through_the_cli(name, trio, tmp_path, capsys):
    a, b, c = trio
    recipe = recipe_for(name, a, b, c)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["mix", str(path), str(tmp_path / "out")]) == 0
    out, base = LazyCheckpoint(tmp_path / "out"), LazyCheckpoint(a)
    assert set(out.tensor_names()) == set(base.tensor_names())
    loaded = Recipe.load(path)
    inputs = [LazyCheckpoint(m).get(LLM_KEY) for m, _ in loaded.models]
    defaults = METHODS[name].parameter_defaults
    params = [{**defaults, **loaded.parameters}] * len(inputs)
    origin = LazyCheckpoint(loaded.base_model or b).get(LLM_KEY)
    expected = mix_tensor(loaded, LLM_KEY, origin, inputs, params, torch.float64, torch.float32)
    assert torch.equal(out.get(LLM_KEY), expected)
    assert torch.isfinite(out.get(LLM_KEY)).all()


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        (
            "nuslerp",
            lambda r: r["models"].append(r["models"][0]),
            "nuslerp mixes exactly 2 models besides the base_model, got 3",
        ),
        ("slerp", lambda r: r["parameters"].update(t=1.5), r"tensor .*: t must be in \[0, 1\], got 1.5"),
        ("della", lambda r: r["parameters"].update(epsilon=0.5), "density ± epsilon must lie in \\(0, 1\\)"),
        ("karcher", lambda r: r["parameters"].update(tol=2.0), r"tol must be in \[1e-12, 1\], got 2.0"),
        ("passthrough", lambda r: r["models"].append(r["models"][0]), "passthrough mixes exactly 1 model, got 2"),
        ("ram", lambda r: r["parameters"].update(epsilon=-1), "epsilon must be in at least 0, got -1"),
        ("sce", lambda r: r["parameters"].update(select_topk="most"), "parameter 'select_topk' must be a number"),
        ("nearswap", lambda r: r["parameters"].pop("t"), "parameter 't' has no value"),
        ("model_stock", lambda r: r["models"].pop(), "model_stock mixes at least 2 models besides the base_model"),
    ],
)
def test_a_bad_parameter_of_a_method_is_one_line_and_writes_nothing(name, change, message, trio, tmp_path):
    a, b, c = trio
    recipe = recipe_for(name, a, b, c)
    change(recipe)
    with pytest.raises(RecipeError, match=message) as error:
        mix(recipe, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_bad_parameter_exits_2_from_the_cli(trio, tmp_path, capsys):
    a, b, c = trio
    recipe = recipe_for("della", a, b, c)
    recipe["parameters"]["epsilon"] = 0.5
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["mix", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "epsilon" in err and "Traceback" not in err
