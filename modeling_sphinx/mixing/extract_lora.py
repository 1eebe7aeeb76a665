"""A PEFT LoRA adapter extracted from two SPHINX model folders of one architecture: `extract_lora(base, tuned, out)`.

For each linear layer of the LLM (`q/k/v/o_proj`, `gate/up/down_proj` of every decoder layer) whose weight differs,
ΔW = W_tuned − W_base is formed in float32 and its truncated SVD U_r·S_r·V_rᵀ, with r = min(rank, out, in), is
split evenly between PEFT's factors: `lora_B` = U_r·√S_r [out, r] and `lora_A` = √S_r·V_rᵀ [r, in], with
`lora_alpha` = r so that PEFT's scaling is 1 and W_base + B·A is the best rank-r approximation of W_tuned (the
singular values by LAPACK, in float32). The factors are stored in float32, the dtype PEFT computes adapters in
whatever the base's, so that an extraction at full rank reproduces the tuned weights to float32 rounding.

Every other tensor that differs is carried whole from the tuned model through PEFT's `modules_to_save` when it
belongs to a leaf module (one whose tensors are all its own: embeddings, norms, `lm_head`, a projector's linear
layer or norm, a layer of a vision tower); the module's tensors are written under the names
`PeftModel.save_pretrained` gives them (`base_model.model.NAME.weight`), so `PeftModel.from_pretrained(base, out)`
restores them. A tensor that is a plain parameter of a larger module (`model.start_img`, `model.end_img`, a tower's
`pos_embed`) or a bias of an extracted linear layer cannot be carried by PEFT: it is reported, with its relative
difference ‖ΔW‖/‖W_base‖, and left out.

The inputs are checked before anything is written: both folders are SPHINX model folders with the same tensor
names and shapes, and hold only finite values. Tensors are read one at a time with `LazyCheckpoint`; the factors
are kept until the end (r·(out+in) values per layer, a small part of the model), the carried tensors are read again
from the tuned model as they are written, and the folder appears only when complete (`atomic_output_dir`).
"""

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..folder.atomic import atomic_output_dir
from ..folder.shards import LazyCheckpoint, StreamingShardWriter, refuse_non_finite

logger = logging.getLogger(__name__)

LLM_LINEAR_WEIGHT = re.compile(
    r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight"
)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what `PeftModel.save_pretrained` puts before a module's name
FACTOR_DTYPE = torch.float32


class ExtractionError(ValueError):
    """Input that an adapter cannot be extracted from; the message names the folder, tensor or value."""


@dataclass
class ExtractedLayer:
    """One linear layer's factors and what of ΔW they keep."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    kept_energy: float  # Σ_{i<r} s_i² / Σ s_i²
    kept: float  # Σ_{i<r} s_i²
    total: float  # Σ s_i² = ‖ΔW‖²_F

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class Extraction:
    """What differs between the two models and how the adapter carries it."""

    layers: dict[str, ExtractedLayer] = field(default_factory=dict)  # module name → factors
    carried_modules: list[str] = field(default_factory=list)
    not_carried: dict[str, float] = field(default_factory=dict)  # tensor name → ‖ΔW‖ / ‖W_base‖


def _open_model(folder: str | Path, role: str) -> LazyCheckpoint:
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a model folder" if folder.exists() else "does not exist"
        raise ExtractionError(f"{role} model folder {str(folder)!r} {what}; give a SPHINX model folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExtractionError(f"{role} model folder {str(folder)!r} has no config.json: not a model folder")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ExtractionError(f"{config_path}: not a readable JSON config ({error})") from None
    if model_type != "sphinx":
        raise ExtractionError(f"{role} model folder {str(folder)!r}: model_type is {model_type!r}, not 'sphinx'")
    try:
        return LazyCheckpoint(folder)
    except ValueError as error:
        raise ExtractionError(f"{role} model folder {str(folder)!r}: {error}") from None


def open_models(base: str | Path, tuned: str | Path) -> tuple[LazyCheckpoint, LazyCheckpoint]:
    """Both folders' weights, once they are SPHINX model folders with the same tensor names and shapes."""
    base_weights, tuned_weights = _open_model(base, "base"), _open_model(tuned, "tuned")
    names, theirs = set(base_weights.tensor_names()), set(tuned_weights.tensor_names())
    if names != theirs:
        missing, extra = sorted(names - theirs), sorted(theirs - names)
        raise ExtractionError(
            f"the tuned model {str(tuned)!r} has other tensors than the base {str(base)!r}: missing {missing[:5]}, "
            f"extra {extra[:5]}; both must be of one architecture"
        )
    for name in sorted(names):
        if base_weights.shape(name) != tuned_weights.shape(name):
            raise ExtractionError(
                f"tensor {name} has shape {list(tuned_weights.shape(name))} in the tuned model {str(tuned)!r} but "
                f"{list(base_weights.shape(name))} in the base {str(base)!r}; both must be of one architecture"
            )
    return base_weights, tuned_weights


def check_rank(rank: int):
    if rank < 1:
        raise ExtractionError(f"rank must be at least 1, got {rank}")


def factorize(delta: torch.Tensor, rank: int) -> ExtractedLayer:
    """The rank-min(rank, out, in) truncated SVD of `delta` [out, in] as LoRA factors B·A, √S on either side."""
    u, s, vh = torch.linalg.svd(delta.to(FACTOR_DTYPE), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    energies = s.double().square()
    kept, total = float(energies[:r].sum()), float(energies.sum())
    # fresh row-major copies: LAPACK's factors are column-major, and a [n, 1] slice of them counts as contiguous
    # while its last stride is not 1, which the writer's byte view refuses
    row_major = torch.contiguous_format
    return ExtractedLayer(
        lora_a=(root[:, None] * vh[:r]).clone(memory_format=row_major),
        lora_b=(u[:, :r] * root).clone(memory_format=row_major),
        kept_energy=kept / total,
        kept=kept,
        total=total,
    )


def _leaf_modules(names: list[str]) -> set[str]:
    """The modules whose tensors are all their own (no submodule holds any): the ones PEFT can carry whole."""
    owners = {name.rpartition(".")[0] for name in names}
    ancestors = {owner[:index] for owner in owners for index, char in enumerate(owner) if char == "."}
    return {owner for owner in owners if owner and owner not in ancestors}


def relative_difference(base: torch.Tensor, tuned: torch.Tensor) -> float:
    base_norm = float(base.double().norm())
    difference = float((tuned.double() - base.double()).norm())
    return difference / base_norm if base_norm else math.inf


def _compare(base: LazyCheckpoint, tuned: LazyCheckpoint, rank: int) -> Extraction:
    """Read every tensor pair once: refuse non-finite values, factorize the linear layers' differences, and sort
    every other difference into carried modules and tensors left out."""
    names = sorted(base.tensor_names())
    leaves = _leaf_modules(names)
    extraction = Extraction()
    carried = set()
    for name in names:
        base_tensor, tuned_tensor = base.get(name), tuned.get(name)
        refuse_non_finite(
            name, base_tensor, f"the base model {str(base.folder)!r} cannot be used; nothing was written"
        )
        refuse_non_finite(
            name, tuned_tensor, f"the tuned model {str(tuned.folder)!r} cannot be used; nothing was written"
        )
        if torch.equal(base_tensor, tuned_tensor):
            continue
        module = name.rpartition(".")[0]
        if LLM_LINEAR_WEIGHT.fullmatch(name):
            delta = tuned_tensor.to(FACTOR_DTYPE) - base_tensor.to(FACTOR_DTYPE)
            if not delta.any():  # a difference below float32's resolution
                continue
            layer = extraction.layers[module] = factorize(delta, rank)
            logger.info("%s: rank %d keeps %.6f of the energy", module, layer.rank, layer.kept_energy)
        elif module in leaves and not LLM_LINEAR_WEIGHT.fullmatch(f"{module}.weight"):
            carried.add(module)
        else:
            extraction.not_carried[name] = relative_difference(base_tensor, tuned_tensor)
            logger.warning(
                "%s differs (relative difference %.3g) but is no module PEFT can save: left out",
                name,
                extraction.not_carried[name],
            )
    extraction.carried_modules = sorted(carried)
    if not extraction.layers:
        others = extraction.carried_modules + sorted(extraction.not_carried)
        what = f"only {others[:5]} differ" if others else "no tensor differs"
        raise ExtractionError(
            f"the tuned model {str(tuned.folder)!r} leaves no LLM linear layer to extract from the base "
            f"{str(base.folder)!r} ({what}); a LoRA adapter needs one: use the tuned model as it is"
        )
    return extraction


def _lora_config(extraction: Extraction, base_reference: str):
    from peft import LoraConfig

    ranks = {module: layer.rank for module, layer in extraction.layers.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT reads pattern keys as regular expressions; scaling lora_alpha / r stays 1 where a layer's rank differs
    others = {re.escape(module): r for module, r in ranks.items() if r != common}
    return LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=others,
        alpha_pattern=dict(others),
        target_modules=sorted(ranks),
        modules_to_save=extraction.carried_modules or None,
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_reference,
        inference_mode=True,
    )


def overall_kept_energy(extraction: Extraction) -> float:
    """The kept energy over all extracted layers, each weighted by its ‖ΔW‖² (none is zero)."""
    total = sum(layer.total for layer in extraction.layers.values())
    return sum(layer.kept for layer in extraction.layers.values()) / total


def _card(extraction: Extraction, base_reference: str, tuned_reference: str, rank: int) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    from ..folder.card import hub_reference

    data = ModelCardData(
        library_name="peft",
        base_model=hub_reference(base_reference),
        tags=["sphinx", "lora", "extracted-lora"],
    )
    overall = overall_kept_energy(extraction)
    lines = [
        f"# LoRA adapter: {tuned_reference} − {base_reference}",
        "",
        f"The difference between `{tuned_reference}` and its base `{base_reference}` (SPHINX), extracted by "
        f"`sphinx-mllm extract-lora` at rank {rank}: each linear layer of the LLM as the truncated SVD of its "
        "ΔW = W_tuned − W_base (factors in float32, scaling 1), the other differing modules saved whole.",
        "",
        f"- layers extracted: {len(extraction.layers)}, kept energy {overall:.6f} overall (Σ kept s² / Σ s², all "
        "layers)",
        f"- modules carried whole (`modules_to_save`): {', '.join(extraction.carried_modules) or 'none'}",
    ]
    if extraction.not_carried:
        left_out = ", ".join(f"`{name}` ({value:.3g})" for name, value in extraction.not_carried.items())
        lines.append(f"- differing tensors PEFT cannot save, left out (relative difference): {left_out}")
    lines += [
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForImageTextToText",
        "",
        f'base = AutoModelForImageTextToText.from_pretrained("{base_reference}", trust_remote_code=True)',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
    ]
    lines += ["", "| layer | rank | kept energy |", "|---|---:|---:|"]
    lines += [
        f"| `{module}` | {layer.rank} | {layer.kept_energy:.6f} |" for module, layer in extraction.layers.items()
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def extract_lora(base: str | Path, tuned: str | Path, out: str | Path, rank: int = 32) -> dict:
    """Write into `out` a PEFT LoRA adapter that turns the `base` model into (an approximation of) `tuned`:
    `adapter_config.json`, `adapter_model.safetensors` and a model card. Returns a summary: per extracted layer its
    rank and kept energy, the overall kept energy, the modules carried whole, and the tensors left out."""
    check_rank(rank)
    base_weights, tuned_weights = open_models(base, tuned)
    extraction = _compare(base_weights, tuned_weights, rank)
    from ..folder.card import model_reference

    base_reference, tuned_reference = model_reference(base), model_reference(tuned)

    layout = {}
    for module, layer in extraction.layers.items():
        layout[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (tuple(layer.lora_a.shape), FACTOR_DTYPE)
        layout[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (tuple(layer.lora_b.shape), FACTOR_DTYPE)
    carried_tensors = {}
    for name in sorted(tuned_weights.tensor_names()):
        if name.rpartition(".")[0] in extraction.carried_modules:
            carried_tensors[f"{PEFT_PREFIX}{name}"] = name
            layout[f"{PEFT_PREFIX}{name}"] = (tuned_weights.shape(name), tuned_weights.dtype(name))
    needed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())

    with atomic_output_dir(out, needed_bytes=needed) as staging:
        # one shard holds everything; the writer names it model.safetensors, PEFT reads adapter_model.safetensors
        with StreamingShardWriter(staging, layout, max_bytes=needed + 1) as writer:
            for key in layout:
                if key in carried_tensors:
                    writer.write(key, tuned_weights.get(carried_tensors[key]))
                else:
                    module, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
                    layer = extraction.layers[module]
                    writer.write(key, layer.lora_a if factor == "A.weight" else layer.lora_b)
        (staging / "model.safetensors").rename(staging / ADAPTER_WEIGHTS)
        _lora_config(extraction, base_reference).save_pretrained(staging)
        (staging / "README.md").write_text(_card(extraction, base_reference, tuned_reference, rank))

    return {
        "base": base_reference,
        "tuned": tuned_reference,
        "rank": rank,
        "layers": {
            module: {"rank": layer.rank, "kept_energy": layer.kept_energy}
            for module, layer in extraction.layers.items()
        },
        "overall_kept_energy": overall_kept_energy(extraction),
        "carried_modules": extraction.carried_modules,
        "not_carried": extraction.not_carried,
        "out": str(out),
    }
