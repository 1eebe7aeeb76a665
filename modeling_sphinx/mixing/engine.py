"""The mix of whole checkpoints: the inputs opened and checked, every tensor's parameters planned before anything
is written, the tensors streamed into the output folder, and the card."""

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..folder.atomic import atomic_output_dir
from ..folder.dtypes import DTYPES
from ..folder.shards import DECODER_SHAPE_FIELDS, LazyCheckpoint, StreamingShardWriter, parse_size
from .methods import METHODS, BaseRole, RecipeError, check_parameters, mix_tensor
from .recipe import Recipe, params_for

# config fields that must agree for checkpoints to be mixed
ARCHITECTURE_FIELDS = (
    "model_type",
    "image_size",
    "view_size",
    "crop_grid",
    "convnext_view_size",
    "image_token_id",
    "clip_config",
    "convnext_config",
    "dinov2_config",
    "qformer_config",
)
TEXT_FIELDS = (*DECODER_SHAPE_FIELDS, "vocab_size")
WEIGHT_FILES = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


@dataclass
class _Inputs:
    base: LazyCheckpoint
    base_config: dict
    participants: list[tuple[LazyCheckpoint, dict]]


def _load_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise RecipeError(f"model {folder}: no config.json (not a model folder)")
    return json.loads(path.read_text())


IGNORED_CONFIG_KEYS = {"dtype", "torch_dtype", "_name_or_path", "transformers_version", "architectures", "auto_map"}


def _architecture(value):
    """A config value without the keys that say nothing about tensor shapes or semantics."""
    if isinstance(value, dict):
        return {k: _architecture(v) for k, v in value.items() if k not in IGNORED_CONFIG_KEYS}
    return value


def _check_same_architecture(reference: tuple[Path, dict], other: tuple[Path, dict]):
    (ref_path, ref), (path, config) = reference, other
    if config.get("model_type") != "sphinx":
        raise RecipeError(f"model {path}: model_type is {config.get('model_type')!r}, not 'sphinx'")
    for key in TEXT_FIELDS:
        ours, theirs = config.get("text_config", {}).get(key), ref.get("text_config", {}).get(key)
        if ours != theirs:
            what = "vocabulary size" if key == "vocab_size" else f"text_config.{key}"
            raise RecipeError(f"model {path}: {what} is {ours} but {ref_path} has {theirs}")
    for key in ARCHITECTURE_FIELDS:
        ours, theirs = _architecture(config.get(key)), _architecture(ref.get(key))
        if ours != theirs:
            raise RecipeError(f"model {path}: {key} differs from {ref_path} ({ours!r} vs {theirs!r})")


def _open_inputs(recipe: Recipe) -> _Inputs:
    folders = [path for path, _ in recipe.models]
    base_path = recipe.base_model or folders[0]
    configs = {}
    for folder in dict.fromkeys([base_path, *folders]):
        if not folder.is_dir():
            raise RecipeError(f"model {folder}: folder does not exist")
        configs[folder] = _load_config(folder)
    reference = (base_path, configs[base_path])
    for folder, config in configs.items():
        _check_same_architecture(reference, (folder, config))
    checkpoints = {}
    for folder in configs:
        try:
            checkpoints[folder] = LazyCheckpoint(folder)
        except ValueError as error:
            raise RecipeError(f"model {folder}: {error}") from error
    base = checkpoints[base_path]
    keys = set(base.tensor_names())
    for folder, checkpoint in checkpoints.items():
        theirs = set(checkpoint.tensor_names())
        if theirs != keys:
            missing, extra = sorted(keys - theirs), sorted(theirs - keys)
            raise RecipeError(
                f"model {folder}: tensors differ from {base_path}: missing {missing[:10]}, extra {extra[:10]}"
            )
        for key in keys:
            if checkpoint.shape(key) != base.shape(key):
                what = "vocabulary size differs: " if "embed_tokens" in key or key.startswith("lm_head") else ""
                raise RecipeError(
                    f"model {folder}: {what}tensor {key} has shape {list(checkpoint.shape(key))}, "
                    f"{base_path} has {list(base.shape(key))}"
                )
    spec = METHODS[recipe.merge_method]
    if spec.base_role is BaseRole.LISTED_MODEL or recipe.base_model is None:
        participants = [(checkpoints[path], params) for path, params in recipe.models]
    else:  # the base's task vector is zero: it is not a participant
        participants = [(checkpoints[path], params) for path, params in recipe.models if path != base_path]
    _check_model_count(recipe.merge_method, spec, len(participants), besides_base=recipe.base_model is not None)
    _check_tokenizers(list(configs))
    return _Inputs(base, configs[base_path], participants)


def _check_model_count(method: str, spec, count: int, besides_base: bool):
    low, high = spec.min_models, spec.max_models
    if low <= count and (high is None or count <= high):
        return
    wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
    models = "model" if (high or low) == 1 else "models"
    where = " besides the base_model" if besides_base and spec.base_role is not BaseRole.LISTED_MODEL else ""
    raise RecipeError(f"{method} mixes {wanted} {models}{where}, got {count}")


def _check_tokenizers(folders: list[Path]):
    vocabularies = {}
    for folder in folders:
        path = folder / "tokenizer.json"
        if path.is_file():
            vocabularies[folder] = json.loads(path.read_text()).get("model", {}).get("vocab")
    items = list(vocabularies.items())
    for folder, vocab in items[1:]:
        if vocab != items[0][1]:
            raise RecipeError(f"model {folder}: its tokenizer vocabulary differs from {items[0][0]}'s")


def _plan_parameters(recipe: Recipe, inputs: _Inputs, mixed: list[str], num_layers: int) -> dict[str, list[dict]]:
    """Every mixed tensor's resolved parameters, validated before anything is written."""
    spec, plan = METHODS[recipe.merge_method], {}
    for name in mixed:
        params = [params_for(recipe, p, name, num_layers) for _, p in inputs.participants] or [
            params_for(recipe, {}, name, num_layers)
        ]
        for (checkpoint, _), values in zip(inputs.participants, params, strict=False):
            for key, value in values.items():
                if value is None:
                    raise RecipeError(f"model {checkpoint.folder}: parameter {key!r} has no value for tensor {name}")
            check_parameters(spec, values, f"model {checkpoint.folder}, tensor {name}")
        if params[0].get("normalize"):  # only methods with weights have `normalize`
            total = sum(float(p["weight"]) for p in params)
            if abs(total) < 1e-6:
                raise RecipeError(f"the weights for tensor {name} sum to {total}: normalising would divide by zero")
        plan[name] = params
    return plan


def mix(recipe: "str | Path | dict | Recipe", out_dir: str | Path, max_shard_size: str | int = "2GB") -> Path:
    """Mix the recipe's models into `out_dir` (sharded safetensors, config, processor, remote code, card)."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    inputs = _open_inputs(recipe)
    names = inputs.base.tensor_names()
    patterns = [re.compile(p) for p in recipe.mixed_tensors]
    mixed = [n for n in names if any(p.search(n) for p in patterns)]
    num_layers = inputs.base_config.get("text_config", {}).get("num_hidden_layers", 1)
    plan = _plan_parameters(recipe, inputs, mixed, num_layers)
    compute = DTYPES[recipe.dtype]

    layout = {
        name: (inputs.base.shape(name), DTYPES[recipe.out_dtype] if recipe.out_dtype else inputs.base.dtype(name))
        for name in names
    }
    needed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
    with atomic_output_dir(out_dir, needed_bytes=needed) as staging:
        writer = StreamingShardWriter(staging, layout, parse_size(max_shard_size))
        for name in names:
            base_tensor = inputs.base.get(name)
            out_dtype = layout[name][1]
            if name in plan:
                tensors = [checkpoint.get(name) for checkpoint, _ in inputs.participants]
                result = mix_tensor(recipe, name, base_tensor, tensors, plan[name], compute, out_dtype)
                del tensors
                writer.write(name, result)
            else:
                writer.write(name, base_tensor.to(out_dtype))
        writer.finish()
        dropped = sorted(set(names) - writer.written_names())
        if dropped:
            raise RecipeError(f"internal error: the output would lack tensors {dropped[:10]}")
        for path in inputs.base.folder.iterdir():
            if path.is_file() and not WEIGHT_FILES.fullmatch(path.name) and path.name != "README.md":
                shutil.copy2(path, staging / path.name)
        _write_card(staging, recipe)
    return Path(out_dir)


def _card_reference(written, folder: Path) -> str:
    """How a card names a recipe's model: its Hub id as written, else only the folder's name, never a local path."""
    from ..folder.card import hub_reference

    return hub_reference(written) or Path(os.path.abspath(folder)).name  # abspath: `..` resolved, links kept


def _write_card(folder: Path, recipe: Recipe):
    from ..folder.card import write_model_card

    source = dict(recipe.source)
    if source.get("base_model"):
        source["base_model"] = _card_reference(source["base_model"], recipe.base_model)
    if "models" in source:
        source["models"] = [
            {**entry, "model": _card_reference(entry["model"], path)}
            for entry, (path, _) in zip(source["models"], recipe.models, strict=True)
        ]
    bases = [source["base_model"]] if source.get("base_model") else []
    bases += [entry["model"] for entry in source.get("models", [])]
    write_model_card(
        folder,
        provenance={"kind": "mixed", "method": recipe.merge_method, "recipe": yaml.safe_dump(source, sort_keys=False)},
        base_models=list(dict.fromkeys(bases)),
    )
