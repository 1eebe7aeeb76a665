"""The mix of whole checkpoints: the inputs opened and checked (text-only donors among them), every tensor's
parameters planned before anything is written, the tensors streamed into the output folder, and the card. A
recipe of stages runs its stages in order, each earlier stage's output a hidden folder next to the output that is
removed once no later stage reads it (and in any case at the end, or on failure)."""

import json
import logging
import math
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..folder.atomic import atomic_output_dir, staging_folder
from ..folder.dtypes import DTYPES
from ..folder.shards import DECODER_SHAPE_FIELDS, LazyCheckpoint, StreamingShardWriter, parse_size
from .donor import TextDonor, is_text_only, vocabulary
from .methods import METHODS, BaseRole, RecipeError, check_parameters, mix_tensor
from .recipe import Recipe, StagedRecipe, load_recipe, params_for, part_of

logger = logging.getLogger(__name__)

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
    checkpoints: dict[Path, "LazyCheckpoint | TextDonor"]


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
    if is_text_only(configs[base_path]):
        role = "the base_model" if recipe.base_model else "the first model (there is no base_model)"
        raise RecipeError(
            f"model {base_path}: a text-only {configs[base_path]['model_type']} cannot be {role}: the towers and "
            "projectors come from it; make a SPHINX folder the base_model"
        )
    donors = [folder for folder, config in configs.items() if is_text_only(config)]
    reference = (base_path, configs[base_path])
    for folder, config in configs.items():
        if folder not in donors:
            _check_same_architecture(reference, (folder, config))
    checkpoints = {}
    for folder in configs:
        if folder not in donors:
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
    _check_tokenizers([folder for folder in configs if folder not in donors])
    for folder in donors:
        donor = checkpoints[folder] = TextDonor(folder, configs[folder], base, configs[base_path])
        if not donor.vocabulary_matches(base_path):
            raise RecipeError(f"model {folder}: its tokenizer vocabulary differs from {base_path}'s")
    for part, setting in recipe.parts.items():
        if setting.source in donors and part != "language_model":
            raise RecipeError(f"parts: {part}: from {setting.source}, a text-only LLM, which has no {part}")
    spec = METHODS[recipe.merge_method]
    if spec.base_role is BaseRole.LISTED_MODEL or recipe.base_model is None:
        participants = [(checkpoints[path], params) for path, params in recipe.models]
    else:  # the base's task vector is zero: it is not a participant
        participants = [(checkpoints[path], params) for path, params in recipe.models if path != base_path]
    _check_model_count(recipe.merge_method, spec, len(participants), besides_base=recipe.base_model is not None)
    return _Inputs(base, configs[base_path], participants, checkpoints)


def _check_model_count(method: str, spec, count: int, besides_base: bool):
    low, high = spec.min_models, spec.max_models
    if low <= count and (high is None or count <= high):
        return
    wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
    models = "model" if (high or low) == 1 else "models"
    where = " besides the base_model" if besides_base and spec.base_role is not BaseRole.LISTED_MODEL else ""
    raise RecipeError(f"{method} mixes {wanted} {models}{where}, got {count}")


def _check_tokenizers(folders: list[Path]):
    vocabularies = {folder: table for folder in folders if (table := vocabulary(folder)) is not None}
    items = list(vocabularies.items())
    for folder, table in items[1:]:
        if table != items[0][1]:
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
    """Mix the recipe's models into `out_dir` (sharded safetensors, config, processor, remote code, card); a recipe
    of `stages` runs them in order, the last one into `out_dir`."""
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)  # every stage checked before any runs
    if isinstance(loaded, Recipe):
        return _mix(loaded, Path(out_dir), max_shard_size, [(None, loaded)])
    out_dir = Path(out_dir)
    intermediate = staging_folder(out_dir, label="stages-")
    try:
        staged = load_recipe(recipe, intermediate)
        for name, stage in staged.stages:
            for folder in stage.inputs():
                if folder.parent != intermediate and not folder.is_dir():
                    raise RecipeError(f"stages: stage {name!r}: model {folder}: folder does not exist")
        for index, (name, stage) in enumerate(staged.stages):
            last = index == len(staged.stages) - 1
            logger.info("stage %d of %d: %s (%s)", index + 1, len(staged.stages), name, stage.merge_method)
            _mix(stage, out_dir if last else intermediate / name, max_shard_size, staged.stages if last else None)
            _remove_unread(intermediate, staged, index)
        return out_dir
    finally:
        shutil.rmtree(intermediate, ignore_errors=True)


def _remove_unread(intermediate: Path, staged: StagedRecipe, done: int):
    """Remove the outputs of the intermediate stages up to `done` that no later stage reads."""
    still_read = set().union(*(stage.inputs() for _, stage in staged.stages[done + 1 :]))
    for name, _ in staged.stages[: min(done + 1, len(staged.stages) - 1)]:
        folder = intermediate / name
        if folder.parent == intermediate and folder.exists() and folder not in still_read:
            shutil.rmtree(folder, ignore_errors=True)


def _mix(recipe: Recipe, out_dir: Path, max_shard_size, card_stages: list | None) -> Path:
    """One recipe into `out_dir`; `card_stages` (name, recipe) pairs go into the card (none: no card)."""
    inputs = _open_inputs(recipe)
    if card_stages is not None:
        threading.Thread(target=_import_card_writer, args=(inputs.base_config,), daemon=True).start()
    names = inputs.base.tensor_names()
    mixed = [n for n in names if recipe.mixes(n)]
    num_layers = inputs.base_config.get("text_config", {}).get("num_hidden_layers", 1)
    plan = _plan_parameters(recipe, inputs, mixed, num_layers)
    compute = DTYPES[recipe.dtype]

    layout = {
        name: (inputs.base.shape(name), DTYPES[recipe.out_dtype] if recipe.out_dtype else inputs.base.dtype(name))
        for name in names
    }
    needed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
    with atomic_output_dir(out_dir, needed_bytes=needed) as staging:
        with StreamingShardWriter(staging, layout, parse_size(max_shard_size)) as writer:
            for name in names:
                out_dtype = layout[name][1]
                if name in plan:
                    tensors = [checkpoint.get(name) for checkpoint, _ in inputs.participants]
                    result = mix_tensor(recipe, name, inputs.base.get(name), tensors, plan[name], compute, out_dtype)
                    del tensors
                    writer.write(name, result)
                else:
                    setting = recipe.parts.get(part_of(name))
                    source = inputs.checkpoints[setting.source] if setting and setting.source else inputs.base
                    writer.write(name, source.get(name).to(out_dtype))
        dropped = sorted(set(names) - writer.written_names())
        if dropped:
            raise RecipeError(f"internal error: the output would lack tensors {dropped[:10]}")
        for path in inputs.base.folder.iterdir():
            if path.is_file() and not WEIGHT_FILES.fullmatch(path.name) and path.name != "README.md":
                shutil.copy2(path, staging / path.name)
        if card_stages:
            _write_card(staging, card_stages)
    return out_dir


def _card_source(recipe: Recipe, stage_names: set[str]) -> tuple[dict, list[str]]:
    from ..folder.card import model_reference

    """The recipe as written, each model named by its Hub id or folder name (an earlier stage by its name), and the
    models it names that are not earlier stages."""
    source = dict(recipe.source)
    if source.get("base_model"):
        source["base_model"] = model_reference(source["base_model"], recipe.base_model)
    if "models" in source:
        source["models"] = [
            {**entry, "model": model_reference(entry["model"], path)}
            for entry, (path, _) in zip(source["models"], recipe.models, strict=True)
        ]
    if source.get("parts"):
        source["parts"] = {
            part: {**entry, "from": model_reference(entry["from"], recipe.parts[part].source)}
            if isinstance(entry, dict) and "from" in entry
            else entry
            for part, entry in source["parts"].items()
        }
    named = [source["base_model"]] if source.get("base_model") else []
    named += [entry["model"] for entry in source.get("models", [])]
    return source, [model for model in named if model not in stage_names]


def _import_card_writer(config: dict):
    """Import what writing the card needs while the tensors are mixed: transformers' config classes (its model
    registry, and the LLM's config, which imports torchvision and torch._dynamo) take seconds of start-up, most
    of a small mix, and the mixing thread waits on reads, writes and torch, which release the GIL."""
    try:
        from ..configuration_sphinx import SphinxConfig
        from ..folder import card  # noqa: F401

        SphinxConfig.from_dict(config)
    except Exception:  # only a head start: writing the card reports any error itself
        logger.debug("importing the card writer ahead failed", exc_info=True)


def _write_card(folder: Path, stages: list[tuple[str | None, Recipe]]):
    from ..folder.card import write_model_card

    names, sources, bases = {name for name, _ in stages}, [], []
    for name, recipe in stages:
        source, external = _card_source(recipe, names)
        sources.append(source if name is None else {"name": name, **source})
        bases += external
    written = sources[0] if len(stages) == 1 and stages[0][0] is None else {"stages": sources}
    method = " then ".join(recipe.merge_method for _, recipe in stages)
    write_model_card(
        folder,
        provenance={"kind": "mixed", "method": method, "recipe": yaml.safe_dump(written, sort_keys=False)},
        base_models=list(dict.fromkeys(bases)),
    )
