"""Weight mixing of SPHINX checkpoints from mergekit-style YAML recipes, streamed tensor by tensor.

SPHINX mixes an LLM tuned on real-world data with one tuned on synthetic data, θ = β·θ_real + (1−β)·θ_syn over
the LLM parameters: that is `merge_method: linear` with weights β and 1−β (see `recipes/mix/`). The recipe
format is mergekit's:

```yaml
merge_method: ties            # one of METHODS
base_model: path/to/base      # needed by the task-vector methods and slerp
models:
  - model: path/to/a
    parameters: {weight: 0.5, density: 0.5}
parameters: {normalize: true} # defaults for every model; per-model parameters win
dtype: float32                # computation dtype (float32 or float64)
out_dtype: bfloat16           # output dtype (default: each tensor's dtype in the base model)
random_seed: 0                # DARE's random masks
mixed_tensors: ['^model\\.language_model\\.', '^lm_head\\.']  # SPHINX: which tensors are mixed
```

A parameter value is a number, a list of numbers (a gradient over the decoder layers: anchors spread evenly
from the first layer to the last, linearly interpolated; tensors before the layers take the first anchor,
those after them the last), or a list of `{filter: substring, value: ...}` entries where the first entry whose
filter occurs in the tensor name wins and an entry without `filter` is the default.

Tensors not matched by `mixed_tensors` (by default the vision encoders, the projections and the start/end
embeddings) are copied from the base model, or the first model without one. Every tensor of the inputs is in
the output; this is checked before the output is published. The output's model card records the recipe with
each model named by its Hub id or its folder's name, never a local path.

Whole-tensor statistics (the TIES thresholds, slerp's angle, model_stock's cosines) are taken over the whole
tensor; the elementwise work then runs on 1M-element slices, which keeps it in the CPU caches.

Each `METHODS` entry is a `Method` record of the method's parts: how it combines the models, how it sparsifies
task vectors, whether it elects signs, whether the base is mixed as a model or is the origin of the others, and
its `normalize` default; the engine reads those parts, never the method's name.

Semantics per tensor, computed in `dtype` (τ_i = θ_i − θ_base are task vectors, w_i weights, λ `lambda`):

- `linear`: Σ w_i θ_i (accumulated in model order), divided by Σ w_i when `normalize` (default true).
- `slerp`: spherical interpolation between the base (t = 0) and the other model (t = 1) of the flattened
  tensors: with cos Ω the cosine of the two normalised vectors, s0 = sin((1−t)Ω)/sin Ω, s1 = sin(tΩ)/sin Ω and
  θ = s0·θ_base + s1·θ_other; linear interpolation when |cos Ω| > 0.9995.
- `task_arithmetic`: θ_base + λ Σ w_i τ_i (divided by Σ w_i when `normalize`, default false).
- `ties` (TIES-Merging): each τ_i keeps its `density` fraction of largest-magnitude entries (those at least
  the k-th largest |τ_i|, k = ⌊density·n⌋; a selection, not a sort); the elected sign is sign(Σ w_i τ_i);
  θ = θ_base + λ Σ w_i τ_i [sign τ_i = elected] / Σ w_i [sign τ_i = elected] (the division when `normalize`,
  default true; positions where no model agrees keep the base).
- `dare_ties`: as `ties`, but each τ_i keeps a random `density` fraction (Bernoulli draws seeded by
  `random_seed`, the tensor name, the model and the 1M-element slice) rescaled by 1/density when `rescale`
  (default true).
- `dare_linear`: the DARE-sparsified task vectors combined as `task_arithmetic` (`normalize` default true).
- `breadcrumbs`: each τ_i drops its `gamma` fraction of largest-magnitude entries and keeps the next `density`
  fraction; combined as `task_arithmetic` (`normalize` default true).
- `model_stock`: with cos θ the mean pairwise cosine of the task vectors and k models,
  t = k·cos θ / (1 + (k−1)·cos θ) and θ = t·mean(θ_i) + (1 − t)·θ_base (needs two or more models).
"""

import json
import math
import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from enum import Enum, auto
from pathlib import Path

import torch
import yaml
from huggingface_hub.dataclasses import strict

from .folder.atomic import atomic_output_dir
from .folder.dtypes import DTYPES
from .folder.shards import DECODER_SHAPE_FIELDS, LazyCheckpoint, StreamingShardWriter, parse_size
from .schema import read, read_yaml_file, ruled, suggest


class RecipeError(ValueError):
    """A recipe or an input that cannot be mixed; the message names the model, tensor or parameter."""


class Combine(Enum):
    """How the models, or their task vectors, become one tensor."""

    WEIGHTED_SUM = auto()  # Σ w_i θ_i over the listed models
    TASK_VECTORS = auto()  # θ_base + λ · the combined (sparsified, sign-elected) task vectors
    SLERP = auto()  # spherical interpolation from the base to exactly one other model
    MODEL_STOCK = auto()  # t·mean(θ_i) + (1 − t)·θ_base, t from the task vectors' mean cosine


class Sparsify(Enum):
    """How each task vector is thinned before the task vectors are combined."""

    NONE = auto()
    TOP_MAGNITUDE = auto()  # keep the `density` fraction of largest-magnitude entries
    BREADCRUMBS = auto()  # drop the `gamma` fraction of largest-magnitude entries, keep the next `density` fraction
    DARE = auto()  # keep a random `density` fraction, rescaled by 1/density when `rescale`

    @property
    def by_magnitude(self) -> bool:
        return self in (Sparsify.TOP_MAGNITUDE, Sparsify.BREADCRUMBS)


class BaseRole(Enum):
    """What the base model is to a method."""

    LISTED_MODEL = auto()  # optional: mixed like any model when listed among them, else it only gives unmixed tensors
    ORIGIN = auto()  # required: the others are measured from it; listing it among the models adds nothing


@dataclass(frozen=True)
class Method:
    """A mixing method by its parts; the engine reads these, never the method's name."""

    combine: Combine
    parameters: dict[str, float | bool | None]  # name → default (None: required), `normalize` apart
    normalize: bool | None = None  # the `normalize` default (divide by the summed weights); None: no such parameter
    sparsify: Sparsify = Sparsify.NONE
    elect_sign: bool = False  # TIES: each entry combines only the task vectors agreeing with sign(Σ w_i τ_i)
    base_role: BaseRole = BaseRole.ORIGIN
    min_models: int = 1  # besides the base

    @property
    def parameter_defaults(self) -> dict[str, float | bool | None]:
        """Every parameter a recipe may set for this method, `normalize` included: name → default."""
        if self.normalize is None:
            return self.parameters
        return {**self.parameters, "normalize": self.normalize}

    @property
    def needs_base(self) -> bool:
        return self.base_role is BaseRole.ORIGIN


METHODS: dict[str, Method] = {
    "linear": Method(Combine.WEIGHTED_SUM, {"weight": None}, normalize=True, base_role=BaseRole.LISTED_MODEL),
    "slerp": Method(Combine.SLERP, {"t": None}),
    "task_arithmetic": Method(Combine.TASK_VECTORS, {"weight": None, "lambda": 1.0}, normalize=False),
    "ties": Method(
        Combine.TASK_VECTORS,
        {"weight": None, "density": 1.0, "lambda": 1.0},
        normalize=True,
        sparsify=Sparsify.TOP_MAGNITUDE,
        elect_sign=True,
    ),
    "dare_ties": Method(
        Combine.TASK_VECTORS,
        {"weight": None, "density": 1.0, "lambda": 1.0, "rescale": True},
        normalize=True,
        sparsify=Sparsify.DARE,
        elect_sign=True,
    ),
    "dare_linear": Method(
        Combine.TASK_VECTORS,
        {"weight": None, "density": 1.0, "lambda": 1.0, "rescale": True},
        normalize=True,
        sparsify=Sparsify.DARE,
    ),
    "breadcrumbs": Method(
        Combine.TASK_VECTORS,
        {"weight": None, "density": 0.9, "gamma": 0.01, "lambda": 1.0},
        normalize=True,
        sparsify=Sparsify.BREADCRUMBS,
    ),
    "model_stock": Method(Combine.MODEL_STOCK, {}, min_models=2),
}
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


SWITCHES = ("normalize", "rescale")  # the parameters that are true or false; all others are numbers


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


def _params_for(recipe: Recipe, model_params: dict, name: str, num_layers: int) -> dict:
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


CHUNK_ELEMENTS = 1 << 20  # elementwise work on 1M-element slices (4 MB in float32) stays in the CPU caches


def _seeded_generator(seed: int, name: str, index: int, chunk: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{index}/{chunk}".encode()))


def kth_largest_(values: torch.Tensor, k: int) -> float:
    """The k-th largest entry (1-based) by selection, not sorting; reorders `values` in place (numpy's
    introselect on the CPU, ~20x faster than `torch.kthvalue` there)."""
    flat = values.reshape(-1)
    position = flat.numel() - k
    if flat.device.type == "cpu":
        array = flat.numpy()
        array.partition(position)
        return float(array[position])
    return float(torch.kthvalue(flat, position + 1).values)


def _magnitude_bounds(delta_magnitude: torch.Tensor, keep: int, drop_top: int = 0) -> tuple[float, float]:
    """`(low, high)`: keep entries with low <= |δ| < high, i.e. the `keep` largest after the `drop_top` largest."""
    n = delta_magnitude.numel()
    if keep + drop_top >= n:
        low = -math.inf
    elif keep + drop_top == 0:
        low = math.inf
    else:
        low = kth_largest_(delta_magnitude, keep + drop_top)
    high = kth_largest_(delta_magnitude, drop_top) if drop_top > 0 else math.inf
    return low, high


class _TensorMix:
    """One tensor's mix: whole-tensor statistics first (thresholds, norms), then elementwise work in chunks."""

    def __init__(self, recipe: Recipe, name: str, base: torch.Tensor, tensors: list[torch.Tensor], params, compute):
        self.recipe, self.name, self.params, self.compute = recipe, name, params, compute
        self.method = METHODS[recipe.merge_method]
        self.base, self.tensors = base.reshape(-1), [t.reshape(-1) for t in tensors]
        self.chunks = [
            (s, min(s + CHUNK_ELEMENTS, self.base.numel())) for s in range(0, self.base.numel(), CHUNK_ELEMENTS)
        ]
        if self.method.sparsify.by_magnitude:
            self.bounds = [self._bounds(t, p) for t, p in zip(self.tensors, params, strict=True)]
        if self.method.combine is Combine.SLERP:
            self.coefficients = self._slerp_coefficients(float(params[0]["t"]))
        if self.method.combine is Combine.MODEL_STOCK:
            self.stock_t = self._model_stock_t()

    def _piece(self, tensor: torch.Tensor, chunk: tuple[int, int]) -> torch.Tensor:
        return tensor[chunk[0] : chunk[1]].to(self.compute)

    def _bounds(self, tensor, params) -> tuple[float, float]:
        magnitude = torch.empty(self.base.numel(), dtype=self.compute)
        for chunk in self.chunks:
            torch.sub(self._piece(tensor, chunk), self._piece(self.base, chunk), out=magnitude[chunk[0] : chunk[1]])
        magnitude.abs_()
        n = magnitude.numel()
        drop_top = int(params["gamma"] * n) if self.method.sparsify is Sparsify.BREADCRUMBS else 0
        return _magnitude_bounds(magnitude, int(params["density"] * n), drop_top)

    def _dots(self, vectors: list[torch.Tensor]) -> list[list[float]]:
        """Gram matrix of flattened vectors, accumulated over chunks in float64."""
        gram = [[0.0] * len(vectors) for _ in vectors]
        for chunk in self.chunks:
            pieces = [v(chunk).double() for v in vectors]
            for i in range(len(pieces)):
                for j in range(i, len(pieces)):
                    gram[i][j] += float(pieces[i] @ pieces[j])
        return [[gram[min(i, j)][max(i, j)] for j in range(len(vectors))] for i in range(len(vectors))]

    def _slerp_coefficients(self, t: float) -> tuple[float, float]:
        (g00, g01), (_, g11) = self._dots(
            [lambda c: self._piece(self.base, c), lambda c: self._piece(self.tensors[0], c)]
        )
        norms = math.sqrt(g00) + 1e-8, math.sqrt(g11) + 1e-8
        dot = g01 / (norms[0] * norms[1])
        if abs(dot) > 0.9995:
            return 1 - t, t
        omega = math.acos(max(-1.0, min(1.0, dot)))
        return math.sin(omega - omega * t) / math.sin(omega), math.sin(omega * t) / math.sin(omega)

    def _model_stock_t(self) -> float:
        deltas = [lambda c, t=t: self._piece(t, c) - self._piece(self.base, c) for t in self.tensors]
        gram = self._dots(deltas)
        k = len(deltas)
        cosines = [
            gram[i][j] / max(math.sqrt(gram[i][i] * gram[j][j]), 1e-8) for i in range(k) for j in range(i + 1, k)
        ]
        cos = sum(cosines) / len(cosines)
        denominator = 1 + (k - 1) * cos
        return k * cos / denominator if denominator != 0 else 0.0

    def _delta(self, index: int, chunk_index: int, chunk, base) -> torch.Tensor:
        params = self.params[index]
        delta = self._piece(self.tensors[index], chunk) - base
        if self.method.sparsify.by_magnitude:
            low, high = self.bounds[index]
            magnitude = delta.abs()
            delta = delta * ((magnitude >= low) & (magnitude < high))
        elif self.method.sparsify is Sparsify.DARE and params["density"] < 1:
            generator = _seeded_generator(self.recipe.random_seed, self.name, index, chunk_index)
            keep = torch.rand(delta.shape, generator=generator) < params["density"]
            delta = delta * keep / (params["density"] if params["rescale"] else 1.0)
        return delta

    def chunk(self, chunk_index: int) -> torch.Tensor:
        chunk = self.chunks[chunk_index]
        combine, params = self.method.combine, self.params
        if combine is Combine.WEIGHTED_SUM:
            weights = [p["weight"] for p in params]
            total = weights[0] * self._piece(self.tensors[0], chunk)
            for weight, tensor in zip(weights[1:], self.tensors[1:], strict=True):
                total = total + weight * self._piece(tensor, chunk)
            return total / sum(weights) if params[0]["normalize"] else total
        base = self._piece(self.base, chunk)
        if combine is Combine.SLERP:
            s0, s1 = self.coefficients
            return s0 * base + s1 * self._piece(self.tensors[0], chunk)
        if combine is Combine.MODEL_STOCK:
            average = sum(self._piece(t, chunk) for t in self.tensors) / len(self.tensors)
            return self.stock_t * average + (1 - self.stock_t) * base
        deltas = [self._delta(i, chunk_index, chunk, base) for i in range(len(self.tensors))]
        mixed = _combine(
            deltas,
            [p["weight"] for p in params],
            normalize=bool(params[0]["normalize"]),
            elect_sign=self.method.elect_sign,
        )
        return base + params[0]["lambda"] * mixed


def _combine(deltas, weights, normalize: bool, elect_sign: bool):
    weighted = [w * d for w, d in zip(weights, deltas, strict=True)]
    total = weighted[0]
    for term in weighted[1:]:
        total = total + term
    if not elect_sign:
        return total / sum(weights) if normalize else total
    elected = torch.sign(total)
    agree = [torch.sign(d) == elected for d in deltas]
    mixed = sum(wd * a for wd, a in zip(weighted, agree, strict=True))
    if normalize:
        divisor = sum(w * a.to(mixed.dtype) for w, a in zip(weights, agree, strict=True))
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
        mixed = mixed / divisor
    return mixed


def mix_tensor(
    recipe: Recipe, name: str, base, tensors: list, params: list[dict], compute=torch.float32, out_dtype=None
):
    """One mixed tensor, computed in `compute` chunk by chunk and stored in `out_dtype` (default: compute)."""
    work = _TensorMix(recipe, name, base, tensors, params, compute)
    out = torch.empty(base.numel(), dtype=out_dtype or compute)
    for index, (start, end) in enumerate(work.chunks):
        out[start:end] = work.chunk(index)
    return out.reshape(base.shape)


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
    if spec.base_role is BaseRole.LISTED_MODEL:
        participants = [(checkpoints[path], params) for path, params in recipe.models]
    else:  # the base's task vector is zero: it is not a participant
        participants = [(checkpoints[path], params) for path, params in recipe.models if path != base_path]
    if spec.combine is Combine.SLERP and len(participants) != 1:
        raise RecipeError(
            f"{recipe.merge_method} mixes the base_model with exactly one other model, got {len(participants)}"
        )
    if len(participants) < spec.min_models:
        raise RecipeError(f"{recipe.merge_method} needs at least {spec.min_models} models besides the base")
    _check_tokenizers(list(configs))
    return _Inputs(base, configs[base_path], participants)


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
    plan = {}
    for name in mixed:
        params = [_params_for(recipe, p, name, num_layers) for _, p in inputs.participants] or [
            _params_for(recipe, {}, name, num_layers)
        ]
        for (checkpoint, _), values in zip(inputs.participants, params, strict=False):
            for key, value in values.items():
                if value is None:
                    raise RecipeError(f"model {checkpoint.folder}: parameter {key!r} has no value for tensor {name}")
                if key in ("density", "gamma", "t") and not 0 <= float(value) <= 1:
                    raise RecipeError(f"model {checkpoint.folder}: {key} must be in [0, 1] for {name}, got {value}")
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
    from .folder.card import hub_reference

    return hub_reference(written) or Path(os.path.abspath(folder)).name  # abspath: `..` resolved, links kept


def _write_card(folder: Path, recipe: Recipe):
    from .folder.card import write_model_card

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
