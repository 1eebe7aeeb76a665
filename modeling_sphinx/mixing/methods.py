"""Mixing methods by their parts, and the mix of one tensor.

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
"""

import math
import zlib
from dataclasses import dataclass
from enum import Enum, auto

import torch


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

    def __init__(self, recipe, name: str, base: torch.Tensor, tensors: list[torch.Tensor], params, compute):
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


def mix_tensor(recipe, name: str, base, tensors: list, params: list[dict], compute=torch.float32, out_dtype=None):
    """One mixed tensor, computed in `compute` chunk by chunk and stored in `out_dtype` (default: compute)."""
    work = _TensorMix(recipe, name, base, tensors, params, compute)
    out = torch.empty(base.numel(), dtype=out_dtype or compute)
    for index, (start, end) in enumerate(work.chunks):
        out[start:end] = work.chunk(index)
    return out.reshape(base.shape)
