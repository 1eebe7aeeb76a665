"""Mixing recipes: the YAML as written (`RecipeFile`), checked and resolved (`Recipe`, or `StagedRecipe` for a
recipe of `stages`), SPHINX's parts and their settings, and each parameter's value for one tensor (the part's,
the model's or the global one; filters, then gradients over the layers)."""

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
# SPHINX's parts by tensor name; a recipe's `parts` sets each one apart (mixed with its own parameters, or taken
# whole from one model)
PARTS = {
    "language_model": r"^(model\.language_model\.|lm_head\.)",
    "clip": r"^model\.clip\.",
    "convnext": r"^model\.convnext\.",
    "dinov2": r"^model\.dinov2\.",
    "qformer": r"^model\.qformer\.",
    "projectors": r"^model\.(visual_proj|qformer_proj)\.",
    "image_boundaries": r"^model\.(start_img|end_img)$",
}
PART_SHAPE = "parts maps a part name to {{parameters: {{...}}}} or {{from: MODEL}}, got {value!r}"


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
    parts: dict | None = ruled(PART_SHAPE, default=None)


@strict
@dataclass
class PartEntry:
    """One entry of a recipe's `parts`: the part mixed with these parameters, or taken whole from one model."""

    parameters: dict | None = ruled("parameters of a part must be a mapping, got {value!r}", default=None)
    source: str | None = ruled("from names the base_model or one of the models, got {value!r}", default=None)


@dataclass(frozen=True)
class PartSetting:
    parameters: dict | None = None  # mixed with these, winning over the models' and the global parameters
    source: Path | None = None  # taken whole from this model


def part_of(name: str) -> str | None:
    return next((part for part, pattern in PARTS.items() if re.search(pattern, name)), None)


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
    parts: dict[str, PartSetting] = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def inputs(self) -> set[Path]:
        """Every folder the recipe reads: its base, its models, its parts' sources."""
        sources = {setting.source for setting in self.parts.values()}
        return {self.base_model, *(path for path, _ in self.models), *sources} - {None}

    def mixes(self, name: str) -> bool:
        """Whether tensor `name` is mixed: its part's setting if the recipe has one, else `mixed_tensors`."""
        setting = self.parts.get(part_of(name))
        if setting is not None:
            return setting.source is None
        return any(re.search(pattern, name) for pattern in self.mixed_tensors)

    @classmethod
    def load(cls, recipe: "str | Path | dict", root: Path | None = None, named: dict | None = None) -> "Recipe":
        """Parse and check a recipe (a YAML file or a dict); relative model paths are relative to the file (or to
        `root`); a model written as one of `named`'s keys (an earlier stage) is that path."""
        recipe, root = _read(recipe, root)
        if not isinstance(recipe, dict):
            raise RecipeError(RECIPE_SHAPE)
        written = read(RecipeFile, recipe, RecipeError, unknown="unknown recipe key {value!r}")
        method, spec = written.merge_method, METHODS[written.merge_method]
        named = named or {}

        def resolve(p):
            if p in named:
                return named[p]
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
        inputs = [base] if base else []
        inputs += [path for path, _ in models]
        parts = {}
        for part, entry in (written.parts or {}).items():
            parts[part] = _part_setting(part, entry, spec, method, inputs, resolve)
        return cls(
            merge_method=method,
            models=models,
            base_model=base,
            parameters=parameters,
            dtype=written.dtype or "float32",
            out_dtype=written.out_dtype,
            random_seed=seed,
            mixed_tensors=list(mixed),
            parts=parts,
            source=recipe,
        )


def _read(recipe: "str | Path | dict", root: Path | None = None) -> tuple:
    """The recipe's mapping and the folder its relative paths start from (the file's, else `root` or here)."""
    if isinstance(recipe, (str, Path)):
        return read_yaml_file(recipe, "recipe file", RecipeError, RECIPE_SHAPE), Path(recipe).parent
    return recipe, root or Path.cwd()


def _part_setting(part, entry, spec: Method, method: str, inputs: list[Path], resolve) -> PartSetting:
    if part not in PARTS:
        raise RecipeError(f"parts: unknown part {part!r}{suggest(str(part), PARTS)}; known: {list(PARTS)}")
    if not isinstance(entry, dict):
        raise RecipeError(f"parts: {part}: {PART_SHAPE.format(value=entry)}")
    for key in entry:
        if key not in ("parameters", "from"):
            raise RecipeError(
                f"parts: {part}: unknown key {key!r}{suggest(str(key), ['parameters', 'from'])}; a part takes "
                "parameters or from"
            )
    written = read(PartEntry, {"parameters": entry.get("parameters"), "source": entry.get("from")}, RecipeError)
    if (written.parameters is None) == (written.source is None):
        both = "not both" if entry.get("from") is not None else "not neither"
        raise RecipeError(f"parts: {part}: give either parameters (mix it) or from (take it whole), {both}")
    if written.source is None:
        return PartSetting(parameters=_checked_parameters(written.parameters, spec, method, f"part {part}"))
    source = resolve(written.source)
    if source not in inputs:
        raise RecipeError(
            f"parts: {part}: from {written.source!r} is not the base_model or one of the models; name one of them"
        )
    return PartSetting(source=source)


@dataclass
class StagedRecipe:
    """A recipe of `stages`: each stage a recipe with a `name`, whose output later stages may name as a model."""

    stages: list[tuple[str, Recipe]]
    source: dict


STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a folder name: never `.`, `..` or a path
STAGE_NAME_RULE = "must be letters, digits, '_', '.' or '-', not starting with '.' or '-'"
STAGES_SHAPE = "stages is a list of recipes, each with a name, the last one giving the output; got {value!r}"


def load_recipe(recipe: "str | Path | dict", intermediate: Path | None = None) -> "Recipe | StagedRecipe":
    """A recipe, or a recipe of `stages` whose stage outputs (but the last) are named folders under
    `intermediate` (by default a placeholder: the paths are only checked)."""
    recipe, root = _read(recipe)
    if not isinstance(recipe, dict) or "stages" not in recipe:
        return Recipe.load(recipe, root=root)
    if set(recipe) != {"stages"}:
        raise RecipeError(f"a recipe of stages has only the key stages, got also {sorted(set(recipe) - {'stages'})}")
    stages = recipe["stages"]
    if not isinstance(stages, list) or not stages or not all(isinstance(stage, dict) for stage in stages):
        raise RecipeError(STAGES_SHAPE.format(value=stages))
    intermediate = intermediate or Path("(intermediate)")
    named, loaded = {}, []
    for index, stage in enumerate(stages, 1):
        name = stage.get("name")
        if not isinstance(name, str) or not STAGE_NAME.fullmatch(name) or name in named:
            what = "is used twice" if isinstance(name, str) and name in named else STAGE_NAME_RULE
            raise RecipeError(f"stages: stage {index}: name {what}, got {name!r}")
        body = {key: value for key, value in stage.items() if key != "name"}
        try:
            loaded.append((name, Recipe.load(body, root=root, named=dict(named))))
        except RecipeError as error:
            raise RecipeError(f"stages: stage {name!r}: {error}") from None
        named[name] = intermediate / name
    for index, (name, _) in enumerate(loaded[:-1]):
        if not any(named[name] in stage.inputs() for _, stage in loaded[index + 1 :]):
            raise RecipeError(f"stages: stage {name!r}: no later stage reads it; name it as a model of one")
    return StagedRecipe(loaded, recipe)


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
    """Every parameter of the recipe's method for one model and tensor: the part's value, else the model's, else the
    global one, else the method's default."""
    spec = METHODS[recipe.merge_method]
    setting = recipe.parts.get(part_of(name))
    scopes = ((setting.parameters or {}) if setting else {}, model_params, recipe.parameters)
    resolved = {}
    for key, default in spec.parameter_defaults.items():
        value = None
        for source in scopes:
            if key in source:
                value = resolve_value(source[key], name, num_layers)
                if value is not None:
                    break
        resolved[key] = default if value is None else value
    return resolved
