"""Mixing recipes: the YAML as written (`RecipeFile`), checked and resolved (`Recipe`), and each parameter's
value for one tensor (filters, then gradients over the layers)."""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub.dataclasses import strict

from ..folder.dtypes import DTYPES
from ..schema import read, read_yaml_file, ruled, suggest
from .methods import METHODS, SWITCHES, Method, RecipeError

RECIPE_SHAPE = "a recipe is a mapping with merge_method, models and parameters"
DEFAULT_MIXED = [r"^model\.language_model\.", r"^lm_head\."]


def _is_path(value) -> bool:
    return isinstance(value, str) and bool(value)


def _dtype_rule(key: str):
    return ruled(
        f"{key} must be one of {sorted(DTYPES)}, got {{value!r}}", lambda v: v is None or v in DTYPES, default=None
    )


@strict
@dataclass
class ModelEntry:
    """One entry of a recipe's `models`: a model folder and its own parameters."""

    model: str = ruled("each models entry needs a 'model' path, got {value!r}", _is_path)
    parameters: dict | None = ruled("parameters of a model must be a mapping, got {value!r}", default=None)


@strict
@dataclass
class RecipeFile:
    """A mixing recipe as written: mergekit's keys and SPHINX's `mixed_tensors` (the tensors mixed; the others
    come from the base model)."""

    merge_method: str = ruled(
        lambda v: f"unknown merge_method {v!r}{suggest(str(v), METHODS)}; known: {sorted(METHODS)}",
        METHODS.__contains__,
    )
    models: list | None = ruled(
        "models is a list of {{model: PATH, parameters: {{...}}}} entries, got {value!r}", default=None
    )
    base_model: str | None = ruled("base_model is a model path, got {value!r}", default=None)
    parameters: dict | None = ruled(
        "parameters of the global parameters must be a mapping, got {value!r}", default=None
    )
    dtype: str | None = _dtype_rule("dtype")
    out_dtype: str | None = _dtype_rule("out_dtype")
    mixed_tensors: list[str] = ruled(
        "mixed_tensors is a list of regular expressions, got {value!r}", default_factory=lambda: list(DEFAULT_MIXED)
    )
    random_seed: int = ruled("random_seed is an integer, got {value!r}", lambda v: not isinstance(v, bool), default=0)


# config fields that must agree for checkpoints to be mixed


@dataclass
class Recipe:
    merge_method: str
    models: list[tuple[Path, dict]]
    base_model: Path | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str = "float32"
    out_dtype: str | None = None
    random_seed: int = 0
    mixed_tensors: list[str] = field(default_factory=lambda: list(DEFAULT_MIXED))
    source: dict = field(default_factory=dict)

    @classmethod
    def load(cls, recipe: "str | Path | dict") -> "Recipe":
        """Parse and check a recipe (a YAML file or a dict); relative model paths are relative to the file."""
        root = Path.cwd()
        if isinstance(recipe, (str, Path)):
            root = Path(recipe).parent
            recipe = read_yaml_file(recipe, "recipe file", RecipeError, RECIPE_SHAPE)
        if not isinstance(recipe, dict):
            raise RecipeError(RECIPE_SHAPE)
        written = read(RecipeFile, recipe, RecipeError, unknown="unknown recipe key {value!r}")
        method, spec = written.merge_method, METHODS[written.merge_method]

        def resolve(p):
            p = Path(p)
            return p if p.is_absolute() else (root / p)

        models = []
        for entry in written.models or []:
            if not isinstance(entry, dict):
                raise RecipeError(f"each models entry needs a 'model' path, got {entry!r}")
            unknown = f"unknown key {{value!r}} in the entry of model {entry.get('model')}"
            model = read(ModelEntry, entry, RecipeError, unknown=unknown)
            params = _checked_parameters(model.parameters or {}, spec, method, f"model {model.model}")
            models.append((resolve(model.model), params))
        parameters = _checked_parameters(written.parameters or {}, spec, method, "the global parameters")
        base = resolve(written.base_model) if written.base_model else None
        if spec.needs_base and base is None:
            raise RecipeError(f"merge_method {method} needs a base_model")
        if not models:
            raise RecipeError("the recipe lists no models")
        if written.dtype in ("bfloat16", "float16"):
            raise RecipeError("dtype is the computation dtype: use float32 or float64 (out_dtype sets the output)")
        mixed, seed = written.mixed_tensors, written.random_seed
        for pattern in mixed:
            try:
                re.compile(pattern)
            except re.error as error:
                raise RecipeError(f"mixed_tensors: {pattern!r} is not a valid regular expression: {error}") from error
        return cls(
            merge_method=method,
            models=models,
            base_model=base,
            parameters=parameters,
            dtype=written.dtype or "float32",
            out_dtype=written.out_dtype,
            random_seed=seed,
            mixed_tensors=list(mixed),
            source=recipe,
        )


def _checked_parameters(params: dict, spec: Method, method: str, where: str) -> dict:
    """`params` with every value read as what it must be: a switch true or false, anything else a finite number,
    a list of them (a gradient), or a list of `{filter, value}` entries of either. A number that YAML gave as a
    string (PyYAML reads `5e-1` so) is read as the number it spells."""
    if not isinstance(params, dict):
        raise RecipeError(f"parameters of {where} must be a mapping, got {params!r}")
    accepted = spec.parameter_defaults
    checked = {}
    for name, value in params.items():
        if name not in accepted:
            known = sorted(accepted) or ["(none)"]
            raise RecipeError(
                f"unknown parameter {name!r} for {method} in {where}{suggest(name, accepted)}; known: {known}"
            )
        checked[name] = _parameter_value(value, name, f"{where}: parameter {name!r}")
    return checked


def _parameter_value(value, name: str, where: str):
    if isinstance(value, list) and value and all(isinstance(entry, dict) for entry in value):
        entries = []
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown:
                raise RecipeError(f"{where}: a filtered entry has 'filter' and 'value', not {sorted(unknown)}")
            entries.append({**entry, "value": _parameter_value(entry.get("value"), name, where)})
        return entries
    if isinstance(value, list) and name not in SWITCHES:
        if not value:
            raise RecipeError(f"{where}: an empty list is not a value")
        return [_parameter_value(anchor, name, where) for anchor in value]
    if value is None:
        return None
    if name in SWITCHES:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} is true or false, got {value!r}")
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise RecipeError(f"{where} must be a number, got {value!r}") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise RecipeError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise RecipeError(f"{where} must be a finite number, got {value!r}")
    return float(number)


def _layer_position(name: str, num_layers: int) -> float:
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match:
        return int(match.group(1)) / max(num_layers - 1, 1)
    return 1.0 if re.search(r"(^lm_head\.|\.norm\.weight$)", name) else 0.0


def resolve_value(value, name: str, num_layers: int):
    """A parameter value for one tensor: filters first, then gradients over the layers."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            if "filter" not in entry or entry["filter"] in name:
                return resolve_value(entry.get("value"), name, num_layers)
        return None
    if isinstance(value, list):
        if not value:
            raise RecipeError("an empty list is not a parameter value")
        if len(value) == 1:
            return float(value[0])
        position = _layer_position(name, num_layers) * (len(value) - 1)
        low = min(int(math.floor(position)), len(value) - 2)
        return float(value[low] + (value[low + 1] - value[low]) * (position - low))
    return value


def params_for(recipe: Recipe, model_params: dict, name: str, num_layers: int) -> dict:
    spec = METHODS[recipe.merge_method]
    resolved = {}
    for key, default in spec.parameter_defaults.items():
        value = None
        for source in (model_params, recipe.parameters):
            if key in source:
                value = resolve_value(source[key], name, num_layers)
                if value is not None:
                    break
        resolved[key] = default if value is None else value
    return resolved
