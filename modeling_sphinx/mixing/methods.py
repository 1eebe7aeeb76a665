"""Mixing methods by their parts, and the mix of one tensor.

Each `METHODS` entry is a `Method` record of the method's parts: how it combines the models (`Combine`), how it
thins task vectors (`Sparsify`), which entries of the task vectors it lets combine (`Consensus`), where the
models' weights come from (`Weighting`), what the base model is to it (`BaseRole`), its parameters with their
defaults and limits, and how many models it takes; the engine reads those parts, never the method's name. The
definitions follow each method's paper and mergekit's documentation; where mergekit differs from a paper, the
difference is named below.

A tensor is mixed in two passes: whole-tensor statistics first (thresholds, norms, Gram matrices, variances),
then elementwise work on slices of whole rows of about 1M elements, which stay in the CPU caches. Every method
whose result is a linear combination of the inputs (slerp, nuslerp, multislerp, karcher, model_stock) turns its
statistics into the combination's coefficients, so its elementwise pass is one multiply-add per input.

Semantics per tensor, computed in `dtype` (τ_i = θ_i − θ_base are task vectors, w_i weights, λ `lambda`; "rows"
are the last dimension, a 1-D tensor being one row):

- `linear`: Σ w_i θ_i (accumulated in model order), divided by Σ w_i when `normalize` (default true).
- `slerp`: spherical interpolation between the base (t = 0) and the other model (t = 1) of the flattened
  tensors: with cos Ω the cosine of the two normalised vectors, s0 = sin((1−t)Ω)/sin Ω, s1 = sin(tΩ)/sin Ω and
  θ = s0·θ_base + s1·θ_other; linear interpolation when |cos Ω| > 0.9995.
- `nuslerp`: slerp of exactly two models at t = w_2/(w_1 + w_2) (0.5 when the weights sum to 0), of their task
  vectors when a base is given (then added to it), over the flattened tensor (`nuslerp_flatten`, default true),
  each row (`nuslerp_flatten: false`) or each column (`nuslerp_row_wise: true`); linear only where the two are
  collinear (1 − cos² Ω ≤ 1e-16).
- `multislerp`: barycentric interpolation on the hypersphere of any number of models (their task vectors when a
  base is given): the unit vectors' weighted mean, normalised, is the tangent point; the weighted mean of the
  units' tangent components is mapped back by the exponential map and scaled by the weighted mean norm. Weights
  are divided by their sum when `normalize_weights` (default true).
- `karcher`: the Riemannian (Karcher) mean on the unit sphere of the listed models with equal weights, by
  `max_iter` (10) fixed-point steps stopped when the tangent's norm falls below `tol` (1e-5), scaled by the mean
  norm. Two models of one norm give slerp's midpoint.
- `task_arithmetic`: θ_base + λ Σ w_i τ_i (divided by Σ w_i when `normalize`, default false).
- `ties` (TIES-Merging): each τ_i keeps its `density` fraction of largest-magnitude entries (k = max(1,
  ⌊density·n⌋), those at least the k-th largest |τ_i|; a selection, not a sort); the elected sign is + where
  Σ w_i τ_i ≥ 0, else −; θ = θ_base + λ Σ w_i τ_i [sign τ_i = elected] / Σ w_i [sign τ_i = elected] (the division
  when `normalize`, default true; positions where no model agrees keep the base).
- `breadcrumbs`, `breadcrumbs_ties`: each τ_i drops its `gamma` fraction of largest-magnitude entries and keeps
  the next `density` fraction (fewer dropped when the two exceed 1; nothing dropped at density 1); combined as
  `task_arithmetic`, or as `ties` with sign election (`normalize` default false for both, as mergekit).
- A magnitude-thinned task vector (ties, breadcrumbs) is rescaled to its unthinned L1 norm when `rescale`
  (default false), as mergekit does.
- `dare_ties`, `dare_linear` (DARE): each τ_i keeps a random `density` fraction (Bernoulli draws seeded by
  `random_seed`, the tensor name, the model and the slice) rescaled by 1/density when `rescale` (default true:
  the paper's unbiased rescaling; mergekit matches the L1 norm instead, equal in expectation); combined as
  `ties` or `task_arithmetic` (`normalize` default false, as mergekit).
- `della`, `della_linear` (DELLA's MagPrune): within each row, the entry of magnitude rank r (0 the smallest) of
  m is kept with probability p = density − ε + 2ε·r/(m − 1) (`epsilon` ε, default 0.15; density ± ε must lie in
  (0, 1)), survivors divided by p when `rescale` (default true: the paper's; mergekit matches the L1 norm);
  combined as `ties` (`normalize` default true) or `task_arithmetic` (default false). At density 1 nothing is
  dropped, and della is TIES's sign election on the whole task vectors.
- `sce` (select, calculate, erase): the entries of highest variance across the task vectors, `select_topk` of
  those that vary (default 1: all), are kept in every τ_i; each model's weight is its kept τ_i's mean square
  over the sum of those; the elected sign is that of Σ τ_i; θ = θ_base + Σ e_i τ_i [agrees] / Σ e_i [agrees].
- `ram` (Reinforced Agent Merging): an entry of τ_i contributes where |τ_i| > `epsilon` (1e-5); an entry only
  one model changes is taken whole, one several change is their mean. `ramplus_tl` multiplies model i's unique
  entries by 1 + r·clamp(ρ_i, 0, α), ρ_i the count of its shared entries over that of its unique ones (`r` 0.1,
  `alpha` 0.2), per tensor.
- `model_stock`: with cos θ the mean pairwise cosine of the task vectors (per row when `filter_wise`) and k
  models, t = k·cos θ / (1 + (k−1)·cos θ) (0 where the denominator is below 1e-6) and θ = t·mean(θ_i) +
  (1 − t)·θ_base (needs two or more models).
- `nearswap`: the base moved towards the other model where they are close: with w = clamp(t / max(|θ_other −
  θ_base|, 1e-6), 0, 1), θ = w·θ_other + (1 − w)·θ_base.
- `arcee_fusion`: the other model's change kept where it matters: importance = |τ| times the KL divergence of
  the row's softmax in the other model from the base's; τ is kept where the importance reaches median + 1.5 ×
  the interquartile range of the tensor's importances (exact quantiles; mergekit samples 1M entries above that
  size), dropped elsewhere.
- `passthrough`: the one listed model's tensor times `scale` (default 1).

`int8_mask` is accepted where mergekit accepts it and changes nothing: the masks here are booleans already.
"""

import math
import zlib
from dataclasses import dataclass, field
from enum import Enum, auto

import torch


class RecipeError(ValueError):
    """A recipe or an input that cannot be mixed; the message names the model, tensor or parameter."""


class Combine(Enum):
    """How the models, or their task vectors, become one tensor."""

    WEIGHTED_SUM = auto()  # Σ w_i θ_i over the listed models
    TASK_VECTORS = auto()  # θ_base + the combined (sparsified, consensus-masked) task vectors
    SLERP = auto()  # spherical interpolation from the base to exactly one other model
    NUSLERP = auto()  # spherical interpolation between two models, about the base when there is one
    MULTISLERP = auto()  # barycentre of several models in the tangent space of the sphere
    KARCHER = auto()  # Riemannian mean of the models on the sphere
    MODEL_STOCK = auto()  # t·mean(θ_i) + (1 − t)·θ_base, t from the task vectors' mean cosine
    NEAR_SWAP = auto()  # the base moved towards the other model where the two are close
    FUSION = auto()  # the other model's change where its importance is an outlier
    PASSTHROUGH = auto()  # the one model's tensor, scaled


class Sparsify(Enum):
    """How each task vector is thinned before the task vectors are combined."""

    NONE = auto()
    TOP_MAGNITUDE = auto()  # keep the `density` fraction of largest-magnitude entries
    BREADCRUMBS = auto()  # drop the `gamma` fraction of largest-magnitude entries, keep the next `density` fraction
    DARE = auto()  # keep a random `density` fraction, rescaled by 1/density when `rescale`
    MAGPRUNE = auto()  # DELLA: keep each entry with a probability rising with its magnitude rank in its row
    TOP_VARIANCE = auto()  # SCE: keep, in every task vector, the entries that vary most across them

    @property
    def by_magnitude(self) -> bool:
        return self in (Sparsify.TOP_MAGNITUDE, Sparsify.BREADCRUMBS)

    @property
    def random(self) -> bool:
        return self in (Sparsify.DARE, Sparsify.MAGPRUNE)


class Consensus(Enum):
    """Which entries of the task vectors are combined at each position."""

    ALL = auto()
    SIGN = auto()  # TIES: those agreeing with the elected sign, + where Σ w_i τ_i >= 0
    OVERLAP = auto()  # RAM: each changed entry (|τ_i| > epsilon); several at one position are averaged


class Weighting(Enum):
    """Where the models' weights come from."""

    GIVEN = auto()  # the recipe's `weight` (all 1 for methods without one)
    ENERGY = auto()  # SCE: each task vector's mean square over their sum


class BaseRole(Enum):
    """What the base model is to a method."""

    LISTED_MODEL = auto()  # optional: mixed like any model when listed among them, else it only gives unmixed tensors
    ORIGIN = auto()  # required: the others are measured from it; listing it among the models adds nothing
    OPTIONAL_ORIGIN = auto()  # optional: when given, the others are measured from it; else the models themselves


@dataclass(frozen=True)
class Method:
    """A mixing method by its parts; the engine reads these, never the method's name."""

    combine: Combine
    parameters: dict[str, float | bool | None]  # name → default (None: required), `normalize` apart
    normalize: bool | None = None  # the `normalize` default (divide by the summed weights); None: no such parameter
    sparsify: Sparsify = Sparsify.NONE
    consensus: Consensus = Consensus.ALL
    weighting: Weighting = Weighting.GIVEN
    boost_unique: bool = False  # RAM+: scale each model's unique entries by its share of shared ones
    base_role: BaseRole = BaseRole.ORIGIN
    min_models: int = 1  # besides the base
    max_models: int | None = None  # besides the base
    limits: dict[str, tuple[float, float]] = field(default_factory=dict)  # closed interval per parameter

    @property
    def parameter_defaults(self) -> dict[str, float | bool | None]:
        """Every parameter a recipe may set for this method, `normalize` included: name → default."""
        if self.normalize is None:
            return self.parameters
        return {**self.parameters, "normalize": self.normalize}

    @property
    def needs_base(self) -> bool:
        return self.base_role is BaseRole.ORIGIN


UNIT = (0.0, 1.0)
NON_NEGATIVE = (0.0, math.inf)


def _task_vectors(
    sparsify: Sparsify, consensus: Consensus, normalize: bool, rescale: bool, extra: dict | None = None
) -> Method:
    """A task-arithmetic family member: weights, `lambda`, and what its sparsification reads."""
    parameters: dict = {"weight": None, "lambda": 1.0}
    if sparsify is not Sparsify.NONE:
        parameters |= {"density": 1.0, "rescale": rescale}
    if consensus is Consensus.SIGN:
        parameters["int8_mask"] = False
    limits = {"density": UNIT}
    for name, default in (extra or {}).items():
        parameters[name], limits[name] = default, UNIT
    return Method(Combine.TASK_VECTORS, parameters, normalize, sparsify, consensus, limits=limits)


METHODS: dict[str, Method] = {
    "linear": Method(Combine.WEIGHTED_SUM, {"weight": None}, normalize=True, base_role=BaseRole.LISTED_MODEL),
    "slerp": Method(Combine.SLERP, {"t": None}, max_models=1, min_models=1, limits={"t": UNIT}),
    "nuslerp": Method(
        Combine.NUSLERP,
        {"weight": None, "nuslerp_flatten": True, "nuslerp_row_wise": False},
        base_role=BaseRole.OPTIONAL_ORIGIN,
        min_models=2,
        max_models=2,
    ),
    "multislerp": Method(
        Combine.MULTISLERP, {"weight": None, "normalize_weights": True}, base_role=BaseRole.OPTIONAL_ORIGIN
    ),
    "karcher": Method(
        Combine.KARCHER,
        {"max_iter": 10.0, "tol": 1e-5},
        base_role=BaseRole.LISTED_MODEL,
        limits={"max_iter": (1.0, 10_000.0), "tol": (1e-12, 1.0)},
    ),
    "task_arithmetic": _task_vectors(Sparsify.NONE, Consensus.ALL, normalize=False, rescale=False),
    "ties": _task_vectors(Sparsify.TOP_MAGNITUDE, Consensus.SIGN, normalize=True, rescale=False),
    "dare_ties": _task_vectors(Sparsify.DARE, Consensus.SIGN, normalize=False, rescale=True),
    "dare_linear": _task_vectors(Sparsify.DARE, Consensus.ALL, normalize=False, rescale=True),
    "breadcrumbs": _task_vectors(Sparsify.BREADCRUMBS, Consensus.ALL, False, False, {"gamma": 0.01}),
    "breadcrumbs_ties": _task_vectors(Sparsify.BREADCRUMBS, Consensus.SIGN, False, False, {"gamma": 0.01}),
    "della": _task_vectors(Sparsify.MAGPRUNE, Consensus.SIGN, True, True, {"epsilon": 0.15}),
    "della_linear": _task_vectors(Sparsify.MAGPRUNE, Consensus.ALL, False, True, {"epsilon": 0.15}),
    "sce": Method(
        Combine.TASK_VECTORS,
        {"select_topk": 1.0, "int8_mask": False},
        sparsify=Sparsify.TOP_VARIANCE,
        consensus=Consensus.SIGN,
        weighting=Weighting.ENERGY,
        limits={"select_topk": UNIT},
    ),
    "ram": Method(
        Combine.TASK_VECTORS, {"epsilon": 1e-5}, consensus=Consensus.OVERLAP, limits={"epsilon": NON_NEGATIVE}
    ),
    "ramplus_tl": Method(
        Combine.TASK_VECTORS,
        {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
        consensus=Consensus.OVERLAP,
        boost_unique=True,
        limits={"r": NON_NEGATIVE, "alpha": NON_NEGATIVE, "epsilon": NON_NEGATIVE},
    ),
    "model_stock": Method(Combine.MODEL_STOCK, {"filter_wise": False}, min_models=2),
    "nearswap": Method(Combine.NEAR_SWAP, {"t": None}, max_models=1, limits={"t": NON_NEGATIVE}),
    "arcee_fusion": Method(Combine.FUSION, {}, max_models=1),
    "passthrough": Method(Combine.PASSTHROUGH, {"scale": 1.0}, base_role=BaseRole.LISTED_MODEL, max_models=1),
}
# the parameters that are true or false; all others are numbers
SWITCHES = frozenset(
    name for method in METHODS.values() for name, value in method.parameter_defaults.items() if type(value) is bool
)


def check_parameters(method: Method, values: dict, where: str):
    """Refuse parameter values outside their method's limits, naming `where` (a model and a tensor)."""
    for name, (low, high) in method.limits.items():
        value = values.get(name)
        if value is not None and not low <= float(value) <= high:
            interval = f"[{low:g}, {high:g}]" if high != math.inf else f"at least {low:g}"
            raise RecipeError(f"{where}: {name} must be in {interval}, got {value}")
    if method.sparsify is Sparsify.MAGPRUNE and values["density"] < 1:
        density, epsilon = values["density"], values["epsilon"]
        if not (density - epsilon > 0 and density + epsilon < 1):
            raise RecipeError(
                f"{where}: density ± epsilon must lie in (0, 1) (keep probabilities), got density {density} and "
                f"epsilon {epsilon}; lower epsilon"
            )


CHUNK_ELEMENTS = 1 << 20  # elementwise work on ~1M-element slices (4 MB in float32) stays in the CPU caches


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


def _magnitude_bounds(magnitude: torch.Tensor, params: dict, sparsify: Sparsify) -> tuple[float, float]:
    """`(low, high)`: the entries with low <= |τ| < high survive (reorders `magnitude`)."""
    n, density = magnitude.numel(), params["density"]
    if density >= 1 or n == 0:
        return -math.inf, math.inf
    if density <= 0:
        return math.inf, math.inf
    keep = int(density * n)
    drop_top = 0
    if sparsify is Sparsify.BREADCRUMBS:  # fewer outliers dropped where they and `keep` exceed the tensor
        drop_top = min(int(params["gamma"] * n), n - keep)
    else:
        keep = max(1, keep)
    if keep == 0:
        return math.inf, math.inf
    high = kth_largest_(magnitude, drop_top) if drop_top > 0 else math.inf
    return kth_largest_(magnitude, keep + drop_top), high


def _quantiles(values: torch.Tensor, fractions: list[float]) -> list[float]:
    """Each fraction q's entry of the sorted `values` at index ⌊q·(n − 1)⌋, by selection."""
    n = values.numel()
    return [kth_largest_(values.clone(), n - int(q * (n - 1))) for q in fractions]


def _rows(tensor: torch.Tensor, row: int) -> torch.Tensor:
    return tensor.reshape(-1, row)


class _TensorMix:
    """One tensor's mix: whole-tensor statistics first (thresholds, norms), then elementwise work in chunks of
    whole rows."""

    def __init__(self, recipe, name: str, base: torch.Tensor, tensors: list[torch.Tensor], params, compute):
        self.recipe, self.name, self.params, self.compute = recipe, name, params, compute
        self.method = method = METHODS[recipe.merge_method]
        self.shape = base.shape
        self.base, self.tensors = base.reshape(-1), [t.reshape(-1) for t in tensors]
        n = self.base.numel()
        self.row = base.shape[-1] if base.ndim >= 2 and base.shape[-1] > 0 else max(n, 1)
        step = max(1, CHUNK_ELEMENTS // self.row) * self.row
        if method.combine is Combine.NUSLERP and not self._flag("nuslerp_flatten") and self._flag("nuslerp_row_wise"):
            step = max(n, 1)  # per column: every row at once
        self.chunks = [(s, min(s + step, n)) for s in range(0, n, step)]
        self.has_origin = method.base_role is BaseRole.ORIGIN or (
            method.base_role is BaseRole.OPTIONAL_ORIGIN and recipe.base_model is not None
        )
        self.weights = [float(p.get("weight", 1.0)) for p in params]
        self.coefficients: tuple[float, list[float]] | None = None  # (on the base, on each model)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # `_linear_combination`'s
        if method.sparsify.by_magnitude:
            self._magnitude_statistics()
        if method.sparsify is Sparsify.TOP_VARIANCE:
            self._variance_statistics()
        if method.weighting is Weighting.ENERGY:
            self._energies()
        if method.boost_unique:
            self._unique_boosts()
        if method.combine is Combine.FUSION:
            self._importance_statistics()
        linear_forms = {
            Combine.SLERP: self._slerp_coefficients,
            Combine.MULTISLERP: self._multislerp_coefficients,
            Combine.KARCHER: self._karcher_coefficients,
        }
        if method.combine in linear_forms:
            self.coefficients = linear_forms[method.combine]()
        if method.combine is Combine.NUSLERP and self._flag("nuslerp_flatten"):
            self.coefficients = self._nuslerp_coefficients()
        if method.combine is Combine.MODEL_STOCK and not self._flag("filter_wise"):
            t = self._model_stock_t(self._dots(self._offsets()))
            self.coefficients = (1 - t, [t / len(self.tensors)] * len(self.tensors))

    def _flag(self, name: str) -> bool:
        return bool(self.params[0][name])

    def _piece(self, tensor: torch.Tensor, chunk: tuple[int, int]) -> torch.Tensor:
        return tensor[chunk[0] : chunk[1]].to(self.compute)

    def _raw_delta(self, index: int, chunk) -> torch.Tensor:
        return self._piece(self.tensors[index], chunk) - self._piece(self.base, chunk)

    def _offsets(self) -> list:
        """The vectors a spherical or stock method works on: task vectors about an origin, else the models."""
        if self.has_origin:
            return [lambda c, i=i: self._raw_delta(i, c) for i in range(len(self.tensors))]
        return [lambda c, t=t: self._piece(t, c) for t in self.tensors]

    # ------------------------------------------------------------------ whole-tensor statistics

    def _whole(self, piece) -> torch.Tensor:
        """`piece(chunk)` of every chunk, concatenated: one tensor-sized buffer."""
        out = torch.empty(self.base.numel(), dtype=self.compute)
        for chunk in self.chunks:
            out[chunk[0] : chunk[1]] = piece(chunk)
        return out

    def _magnitude_statistics(self):
        self.bounds, self.l1_scales = [], []
        for index, params in enumerate(self.params):
            magnitude = self._whole(lambda c, i=index: self._raw_delta(i, c).abs())
            total = float(magnitude.sum(dtype=torch.float64))
            low, high = _magnitude_bounds(magnitude.clone(), params, self.method.sparsify)
            kept = float((magnitude * ((magnitude >= low) & (magnitude < high))).sum(dtype=torch.float64))
            self.bounds.append((low, high))
            self.l1_scales.append(total / kept if params["rescale"] and total >= 1e-7 and kept >= 1e-7 else 1.0)

    def _variance_statistics(self):
        self.variance = None
        if self.params[0]["select_topk"] >= 1:
            return
        variance = self._whole(
            lambda c: torch.stack([self._raw_delta(i, c) for i in range(len(self.tensors))]).var(0, correction=0)
        )
        keep = int(int(torch.count_nonzero(variance)) * float(self.params[0]["select_topk"]))
        self.variance = variance
        self.variance_threshold = kth_largest_(variance.clone(), keep) if keep > 0 else math.inf

    def _variance_mask(self, chunk) -> torch.Tensor | None:
        if self.method.sparsify is not Sparsify.TOP_VARIANCE or self.variance is None:
            return None
        return self.variance[chunk[0] : chunk[1]] >= self.variance_threshold

    def _energies(self):
        squares = [0.0] * len(self.tensors)
        for chunk in self.chunks:
            mask = self._variance_mask(chunk)
            for i in range(len(self.tensors)):
                delta = self._raw_delta(i, chunk)
                delta = delta * mask if mask is not None else delta
                squares[i] += float(delta.double().square().sum())
        means = [s / max(self.base.numel(), 1) for s in squares]
        total = sum(means)
        self.weights = [m / total for m in means] if abs(total) >= 1e-6 else [1 / len(means)] * len(means)

    def _unique_boosts(self):
        epsilon, shared, unique = self.params[0]["epsilon"], [0] * len(self.tensors), [0] * len(self.tensors)
        for chunk in self.chunks:
            changed = [self._raw_delta(i, chunk).abs() > epsilon for i in range(len(self.tensors))]
            count = sum(c.to(torch.int32) for c in changed)
            for i, c in enumerate(changed):
                shared[i] += int((c & (count > 1)).sum())
                unique[i] += int((c & (count == 1)).sum())
        r, alpha = self.params[0]["r"], self.params[0]["alpha"]
        self.boosts = [1 + r * min(max(s / max(u, epsilon), 0.0), alpha) for s, u in zip(shared, unique, strict=True)]

    def _importance_statistics(self):
        def importance(chunk):
            other, base = (
                _rows(self._piece(self.tensors[0], chunk), self.row),
                _rows(self._piece(self.base, chunk), self.row),
            )
            p = torch.softmax(other, dim=-1) + 1e-8
            q = torch.softmax(base, dim=-1) + 1e-8
            divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
            return ((other - base).abs() * divergence).reshape(-1)

        self.importance = self._whole(importance)
        q1, median, q3 = _quantiles(self.importance, [0.25, 0.5, 0.75]) if self.importance.numel() else (0, 0, 0)
        self.importance_threshold = median + 1.5 * (q3 - q1)

    def _dots(self, vectors: list) -> list[list[float]]:
        """Gram matrix of flattened vectors, accumulated over chunks in float64."""
        gram = [[0.0] * len(vectors) for _ in vectors]
        for chunk in self.chunks:
            pieces = [v(chunk).double() for v in vectors]
            for i in range(len(pieces)):
                for j in range(i, len(pieces)):
                    gram[i][j] += float(pieces[i] @ pieces[j])
        return [[gram[min(i, j)][max(i, j)] for j in range(len(vectors))] for i in range(len(vectors))]

    # ------------------------------------------------------------------ linear forms: coefficients from statistics

    def _about_origin(self, coefficients: list[float]) -> tuple[float, list[float]]:
        """Coefficients on the offsets as coefficients on the base and the models."""
        return (1 - sum(coefficients) if self.has_origin else 0.0), coefficients

    def _slerp_coefficients(self) -> tuple[float, list[float]]:
        (g00, g01), (_, g11) = self._dots(
            [lambda c: self._piece(self.base, c), lambda c: self._piece(self.tensors[0], c)]
        )
        t = float(self.params[0]["t"])
        norms = math.sqrt(g00) + 1e-8, math.sqrt(g11) + 1e-8
        dot = g01 / (norms[0] * norms[1])
        if abs(dot) > 0.9995:
            return 1 - t, [t]
        omega = math.acos(max(-1.0, min(1.0, dot)))
        return math.sin(omega - omega * t) / math.sin(omega), [math.sin(omega * t) / math.sin(omega)]

    def _nuslerp_t(self) -> float:
        total = sum(self.weights)
        return 0.5 if abs(total) < 1e-6 else self.weights[1] / total

    def _nuslerp_coefficients(self) -> tuple[float, list[float]]:
        (g00, g01), (_, g11) = self._dots(self._offsets())
        return self._about_origin(_geodesic(self._nuslerp_t(), g00, g01, g11))

    def _multislerp_coefficients(self) -> tuple[float, list[float]]:
        k = len(self.tensors)
        if k == 1:
            return 0.0, [1.0]  # one model is itself, with or without a base (as mergekit)
        gram = self._dots(self._offsets())
        eps = 1e-8
        weights = self.weights
        if self._flag("normalize_weights"):
            weights = [w / sum(weights) for w in weights]
        norms = [math.sqrt(gram[i][i]) for i in range(k)]
        units = [[gram[i][j] / ((norms[i] + eps) * (norms[j] + eps)) for j in range(k)] for i in range(k)]
        mean_norm = math.sqrt(max(_quadratic(units, weights), 0.0))
        if mean_norm < eps:
            if k == 2:
                return self._about_origin(weights)
            raise RecipeError(
                f"tensor {self.name}: the weighted mean of the models' directions is zero (opposite models with "
                "balancing weights); multislerp needs other weights"
            )
        mean = [w / mean_norm for w in weights]
        dots = [sum(units[i][j] * mean[j] for j in range(k)) for i in range(k)]
        along = sum(w * d for w, d in zip(weights, dots, strict=True))
        tangent = [w - along * m for w, m in zip(weights, mean, strict=True)]
        tangent_norm = math.sqrt(max(_quadratic(units, tangent), 0.0)) + eps
        on_sphere = [
            math.cos(tangent_norm) * m + math.sin(tangent_norm) / tangent_norm * t
            for m, t in zip(mean, tangent, strict=True)
        ]
        scale = sum(w * n for w, n in zip(weights, norms, strict=True))
        return self._about_origin([scale * c / (n + eps) for c, n in zip(on_sphere, norms, strict=True)])

    def _karcher_coefficients(self) -> tuple[float, list[float]]:
        k = len(self.tensors)
        if k == 1:
            return 0.0, [1.0]
        gram = self._dots(self._offsets())
        max_iter, tol = int(self.params[0]["max_iter"]), float(self.params[0]["tol"])
        norms = [math.sqrt(gram[i][i]) for i in range(k)]
        valid = [i for i in range(k) if norms[i] > tol]
        if not valid:
            return 0.0, [0.0] * k
        units = [
            [gram[i][j] / (norms[i] * norms[j]) if i in valid and j in valid else 0.0 for j in range(k)]
            for i in range(k)
        ]
        alphas = [1 / len(valid) if i in valid else 0.0 for i in range(k)]
        mean_norm = math.sqrt(max(_quadratic(units, alphas), 0.0))
        mean = [a / mean_norm for a in alphas] if mean_norm >= tol else [float(i == valid[0]) for i in range(k)]
        for _ in range(max_iter):
            tangent = [0.0] * k
            for i in valid:
                dot = max(-1.0, min(1.0, sum(mean[j] * units[j][i] for j in range(k))))
                theta = math.acos(dot)
                if theta < tol:
                    continue
                factor = alphas[i] * theta / math.sin(theta)
                tangent = [
                    t + factor * ((j == i) - dot * m) for j, (t, m) in enumerate(zip(tangent, mean, strict=True))
                ]
            tangent_norm = math.sqrt(max(_quadratic(units, tangent), 0.0))
            if tangent_norm < tol:
                break
            mean = [
                math.cos(tangent_norm) * m + math.sin(tangent_norm) * t / tangent_norm
                for m, t in zip(mean, tangent, strict=True)
            ]
            unit_norm = math.sqrt(max(_quadratic(units, mean), 0.0))
            if unit_norm > tol:
                mean = [m / unit_norm for m in mean]
        scale = sum(norms) / k
        return 0.0, [scale * m / norms[i] if i in valid else 0.0 for i, m in enumerate(mean)]

    @staticmethod
    def _model_stock_t(gram: list[list[float]]) -> float:
        k = len(gram)
        cosines = [
            gram[i][j] / max(math.sqrt(gram[i][i] * gram[j][j]), 1e-6) for i in range(k) for j in range(i + 1, k)
        ]
        cos = sum(max(-1.0, min(1.0, c)) for c in cosines) / len(cosines)
        denominator = 1 + (k - 1) * cos
        return k * cos / denominator if abs(denominator) >= 1e-6 else 0.0

    # ------------------------------------------------------------------ elementwise work

    def _delta(self, index: int, chunk_index: int, chunk, base) -> torch.Tensor:
        params, sparsify = self.params[index], self.method.sparsify
        delta = self._piece(self.tensors[index], chunk) - base
        if sparsify.by_magnitude:
            low, high = self.bounds[index]
            magnitude = delta.abs()
            return delta * ((magnitude >= low) & (magnitude < high)) * self.l1_scales[index]
        if sparsify.random and params["density"] < 1:
            generator = _seeded_generator(self.recipe.random_seed, self.name, index, chunk_index)
            keep_probability = self._keep_probability(delta, params)
            keep = torch.rand(delta.shape, generator=generator) < keep_probability
            return delta * keep / (keep_probability if params["rescale"] else 1.0)
        mask = self._variance_mask(chunk)
        return delta * mask if mask is not None else delta

    def _keep_probability(self, delta: torch.Tensor, params: dict):
        density = params["density"]
        if self.method.sparsify is Sparsify.DARE:
            return density
        rows = _rows(delta, self.row)
        ranks = rows.abs().argsort(dim=-1).argsort(dim=-1).to(self.compute)
        spread = ranks / (self.row - 1) if self.row > 1 else torch.full_like(ranks, 0.5)
        return (density - params["epsilon"] + 2 * params["epsilon"] * spread).reshape(-1)

    def chunk(self, chunk_index: int) -> torch.Tensor:
        chunk = self.chunks[chunk_index]
        combine, params = self.method.combine, self.params
        if combine is Combine.WEIGHTED_SUM:
            total = self._linear_combination(chunk, list(zip(self.weights, self.tensors, strict=True)))
            return total.div_(sum(self.weights)) if params[0]["normalize"] else total
        if combine is Combine.PASSTHROUGH:
            return self._linear_combination(chunk, [(params[0]["scale"], self.tensors[0])])
        if self.coefficients is not None:
            on_base, on_models = self.coefficients
            return self._linear_combination(chunk, [(on_base, self.base), *zip(on_models, self.tensors, strict=True)])
        base = self._piece(self.base, chunk)
        if combine is Combine.NUSLERP:
            return self._nuslerp_rows(chunk, base)
        if combine is Combine.MODEL_STOCK:
            return self._model_stock_rows(chunk, base)
        if combine is Combine.NEAR_SWAP:
            other = self._piece(self.tensors[0], chunk)
            closeness = (params[0]["t"] / (other - base).abs().clamp(min=1e-6)).clamp(0, 1)
            return closeness * other + (1 - closeness) * base
        if combine is Combine.FUSION:
            important = self.importance[chunk[0] : chunk[1]] >= self.importance_threshold
            return base + (self._piece(self.tensors[0], chunk) - base) * important
        deltas = [self._delta(i, chunk_index, chunk, base) for i in range(len(self.tensors))]
        return base + self._combine(deltas)

    def _linear_combination(self, chunk: tuple[int, int], terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
        """Σ coefficient · tensor over the chunk, summed in the order of `terms`, in two buffers reused from chunk
        to chunk. The same rounding as the expression written out, without its temporaries: a fresh 4 MB tensor per
        operation costs more in page faults than the arithmetic (a linear mix of 850M parameters: 4.0 s -> 0.8 s).
        The result is overwritten by the next call."""
        size = chunk[1] - chunk[0]
        if self._buffers is None or self._buffers[0].numel() < size:
            self._buffers = (torch.empty(size, dtype=self.compute), torch.empty(size, dtype=self.compute))
        total, term = (buffer[:size] for buffer in self._buffers)
        (first, tensor), *rest = terms
        total.copy_(tensor[chunk[0] : chunk[1]]).mul_(first)
        for coefficient, tensor in rest:
            total.add_(term.copy_(tensor[chunk[0] : chunk[1]]).mul_(coefficient))
        return total

    def _combine(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        method, first = self.method, self.params[0]
        if method.consensus is Consensus.OVERLAP:
            changed = [d.abs() > first["epsilon"] for d in deltas]
            count = sum(c.to(self.compute) for c in changed)
            boosts = self.boosts if method.boost_unique else [1.0] * len(deltas)
            unique = boosts[0] * deltas[0] * changed[0] * (count == 1)
            total = unique + deltas[0] * changed[0] * (count > 1) / count.clamp(min=1)
            for d, c, boost in zip(deltas[1:], changed[1:], boosts[1:], strict=True):
                total = total + boost * d * c * (count == 1) + d * c * (count > 1) / count.clamp(min=1)
            return total
        weighted = [w * d for w, d in zip(self.weights, deltas, strict=True)]
        total = weighted[0]
        for term in weighted[1:]:
            total = total + term
        if method.consensus is Consensus.ALL:
            divisor = sum(self.weights)
            mixed = total / (divisor if abs(divisor) >= 1e-8 else 1.0) if first["normalize"] else total
            return mixed * first["lambda"] if first["lambda"] != 1 else mixed
        # SCE elects on the task vectors as they are; TIES on the weighted ones
        votes = sum(deltas) if method.weighting is Weighting.ENERGY else total
        elected = torch.where(votes >= 0, 1.0, -1.0)
        agree = [torch.sign(d) == elected for d in deltas]
        mixed = sum(wd * a for wd, a in zip(weighted, agree, strict=True))
        divisor = sum(w * a.to(mixed.dtype) for w, a in zip(self.weights, agree, strict=True))
        if method.weighting is Weighting.ENERGY:
            return mixed / divisor.clamp(min=1e-6)
        if first["normalize"]:
            mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        return mixed * first["lambda"] if first["lambda"] != 1 else mixed

    def _nuslerp_rows(self, chunk, base) -> torch.Tensor:
        """nuslerp per row (or per column with `nuslerp_row_wise`), about the base when there is one."""
        v0, v1 = (_rows(v(chunk), self.row) for v in self._offsets())
        if self._flag("nuslerp_row_wise"):
            v0, v1 = v0.T, v1.T
        t = self._nuslerp_t()
        cos = (_unit_rows(v0) * _unit_rows(v1)).sum(-1, keepdim=True).clamp(-1, 1)
        collinear = (1 - cos.square()) <= 1e-16
        theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
        spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
        result = torch.where(collinear, (1 - t) * v0 + t * v1, spherical)
        if self._flag("nuslerp_row_wise"):
            result = result.T
        return result.reshape(-1) + (base if self.has_origin else 0)

    def _model_stock_rows(self, chunk, base) -> torch.Tensor:
        """model_stock with one t per row (`filter_wise`)."""
        rows = [_rows(o(chunk), self.row) for o in self._offsets()]
        k = len(rows)
        cosines = [
            ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
            for i, a in enumerate(rows)
            for b in rows[i + 1 :]
        ]
        cos = torch.stack(cosines).mean(0).unsqueeze(-1)
        denominator = 1 + (k - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1.0, denominator))
        base_rows = _rows(base, self.row)
        average = sum(r + base_rows for r in rows) / k
        return (t * average + (1 - t) * base_rows).reshape(-1)


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-7)


def _quadratic(gram: list[list[float]], coefficients: list[float]) -> float:
    """|Σ c_i v_i|² from the Gram matrix of the v_i."""
    return sum(c_i * c_j * gram[i][j] for i, c_i in enumerate(coefficients) for j, c_j in enumerate(coefficients))


def _geodesic(t: float, g00: float, g01: float, g11: float) -> list[float]:
    """The coefficients of the point at `t` on the great circle from v0 to v1 (nuslerp's rule), from their Gram."""
    cos = max(-1.0, min(1.0, g01 / (max(math.sqrt(g00), 1e-7) * max(math.sqrt(g11), 1e-7))))
    if 1 - cos * cos <= 1e-16:
        return [1 - t, t]
    theta = math.acos(cos)
    return [math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)]


def mix_tensor(recipe, name: str, base, tensors: list, params: list[dict], compute=torch.float32, out_dtype=None):
    """One mixed tensor of a `Recipe` (its method and random seed), computed in `compute` chunk by chunk and
    stored in `out_dtype` (default: compute)."""
    work = _TensorMix(recipe, name, base, tensors, params, compute)
    out = torch.empty(base.numel(), dtype=out_dtype or compute)
    for index, (start, end) in enumerate(work.chunks):
        out[start:end] = work.chunk(index)
    return out.reshape(base.shape)
