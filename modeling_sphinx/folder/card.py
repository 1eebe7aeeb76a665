"""Model cards rendered from the repository's `model_card.md` template with huggingface_hub's `ModelCard`.

Facts come from the model folder's `config.json`, read as the `SphinxConfig` the model runs with, and from how
the model was made (`provenance`); facts we do not know are left out, never invented. A card names a release
only when the model is that release's size, and never records a path on this machine.
"""

import os
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..configuration_sphinx import FUSED_ENCODERS, SPHINX_VARIANTS, SphinxConfig
from .atomic import published_name
from .shards import DECODER_SHAPE_FIELDS

TEMPLATE = Path(__file__).with_name("model_card.md")  # a link to the repository's model_card.md
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# timm's feature width of each released encoder architecture at its default size (what `num_features` reports)
RELEASED_FEATURE_WIDTHS = {
    "vit_large_patch14_clip_224": 1024,
    "convnext_xxlarge": 3072,
    "vit_giant_patch14_dinov2": 1536,
}
LLM_NAMES = {"llama-2-13b": "LLaMA-2-13B", "tinyllama-1.1b": "TinyLlama-1.1B", "mixtral-8x7b": "Mixtral-8x7B"}
ENCODER_NAMES = {
    "clip": "CLIP ViT-L/14",
    "convnext": "OpenCLIP ConvNeXt-XXL",
    "dinov2": "DINOv2 ViT-g/14",
    "qformer": "BLIP-2 ViT-g/14 + Q-Former",
}


def hub_reference(name: str | None) -> str | None:
    """`name` if it is a Hub repo id (`owner/name`, not a folder on this machine), else None: a card records
    where a model can be found by anyone, never a local path."""
    if name and REPO_ID.fullmatch(str(name)) and not Path(name).exists():
        return str(name)
    return None


def model_reference(written, folder: str | Path | None = None) -> str:
    """How a card names a model given as `written` (found at `folder`, by default `written`): its Hub id as
    written, else only its folder's name, never a local path."""
    return hub_reference(str(written)) or Path(os.path.abspath(folder or written)).name  # abspath: `..` resolved


def _is_local_path(value) -> bool:
    """An absolute path, or a relative one with a folder in it that exists here (a bare name is just a name, and
    multi-line text such as a recipe is not a path)."""
    if not isinstance(value, (str, os.PathLike)) or "\n" in str(value):
        return False
    value = str(value)
    return os.path.isabs(value) or (os.sep in value and os.path.exists(value))


def _sizes(config) -> tuple:
    return tuple(getattr(config, field, None) for field in DECODER_SHAPE_FIELDS)


def _size_defining_fields(config: SphinxConfig) -> dict:
    """Per part of the model (the LLM, each encoder, the image geometry), the fields that fix its size."""
    parts = {
        "llm": _sizes(config.text_config),
        "geometry": (
            config.image_size,
            config.view_size,
            config.crop_grid,
            config.convnext_view_size,
            config.patch_size,
        ),
    }
    for name in FUSED_ENCODERS:
        encoder = getattr(config, f"{name}_config")
        parts[name] = (encoder.architecture, encoder.model_args or {}) if encoder is not None else None
    qformer = config.qformer_config
    parts["qformer"] = (
        (_sizes(qformer.vision_config), _sizes(qformer.qformer_config), qformer.num_query_tokens)
        if qformer is not None
        else None
    )
    return parts


def _parts_at_release_size(config: SphinxConfig) -> tuple[set[str], bool]:
    """The parts of the model that have the size of its variant's release, and whether all of them do."""
    if config.variant not in SPHINX_VARIANTS:
        return set(), False
    ours = _size_defining_fields(config)
    release = _size_defining_fields(SphinxConfig.from_variant(config.variant))
    same = {part for part, fields in ours.items() if fields == release[part]}
    return same, same == set(ours)


def _feature_width(encoder_config) -> int:
    """The width of the encoder's token features, as timm's `num_features` gives it: the ViTs' `embed_dim`,
    ConvNeXt's last stage width. Read from the config so that writing a card never imports timm."""
    overrides = encoder_config.model_args or {}
    if "embed_dim" in overrides:
        return int(overrides["embed_dim"])
    if "dims" in overrides:
        return int(overrides["dims"][-1])
    if encoder_config.architecture in RELEASED_FEATURE_WIDTHS:
        return RELEASED_FEATURE_WIDTHS[encoder_config.architecture]
    import torch

    from ..modeling_sphinx import create_timm_encoder

    with torch.device("meta"):  # another timm architecture: build it without memory to ask
        return create_timm_encoder(encoder_config).num_features


def _describe(config: SphinxConfig) -> dict:
    at_release_size, released = _parts_at_release_size(config)

    def encoder_name(name: str) -> str:
        return ENCODER_NAMES[name] + ("" if name in at_release_size else " architecture at reduced size")

    text = config.text_config
    if "llm" in at_release_size:
        llm = LLM_NAMES[SPHINX_VARIANTS[config.variant]["text"]]
    else:
        llm = f"{text.model_type} decoder (not a released size)"
    encoders = {name: getattr(config, f"{name}_config") for name in FUSED_ENCODERS}
    fused_widths = {name: _feature_width(encoder) for name, encoder in encoders.items() if encoder is not None}
    qformer = config.qformer_config
    return {
        "variant": config.variant,
        "released": released,
        "llm": llm,
        "llm_layers": text.num_hidden_layers,
        "llm_width": text.hidden_size,
        "fused_encoders": ", ".join(
            f"{encoder_name(name)} (feature width {width})" for name, width in fused_widths.items()
        ),
        "fused_width": sum(fused_widths.values()),
        "qformer": encoder_name("qformer") if qformer is not None else None,
        "qformer_width": qformer.qformer_config.hidden_size if qformer is not None else None,
        "num_query_tokens": config.num_query_tokens,
        "image_size": config.image_size,
        "view_size": config.view_size,
        "convnext_view_size": config.convnext_view_size if "convnext" in fused_widths else None,
        "patch_size": config.patch_size,
        "num_views": config.num_views,
        "num_crops": config.num_views - 1,
        "tokens_per_view": config.tokens_per_view,
        "num_image_tokens": config.num_image_tokens,
    }


def render_model_card(
    folder: str | Path,
    provenance: dict,
    repo_id: str | None = None,
    license: str | None = None,
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    eval_results: list[dict] | None = None,
) -> ModelCard:
    """The card of the model in `folder`. Provenance values that are local paths are left out, and so are
    `base_models` that are not Hub repo ids."""
    facts = _describe(SphinxConfig.from_pretrained(folder))
    provenance = {key: value for key, value in provenance.items() if value is not None and not _is_local_path(value)}
    hub_bases = [b for b in base_models or [] if hub_reference(b)]
    results = [EvalResult(task_type="image-text-to-text", **row) for row in eval_results or []]
    if repo_id:
        model_name = repo_id.split("/")[-1]
    else:
        model_name = facts["variant"] if facts["released"] else published_name(Path(folder))
    tags = ["sphinx", "multimodal", "custom_code"] + (["merge"] if provenance.get("kind") == "mixed" else [])
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        base_model=hub_bases or None,
        datasets=datasets or None,
        tags=tags,
        model_name=model_name if results else None,
        eval_results=results or None,
        sphinx_mllm=provenance or None,
    )
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        repo_id=repo_id or "path/to/this/folder",
        provenance=provenance,
        eval_results=eval_results or [],
        **facts,
    )


def write_model_card(folder: str | Path, provenance: dict, **kwargs) -> Path:
    path = Path(folder) / "README.md"
    render_model_card(folder, provenance, **kwargs).save(path)
    return path


EVAL_RESULT_FIELDS = ("task_name", "dataset_type", "dataset_name", "metric_type", "metric_name", "metric_value")


def read_card_facts(folder: str | Path) -> tuple[dict, dict]:
    """What the folder's `README.md` records, to render it again: `(provenance, render_model_card kwargs)`."""
    provenance = {}
    kwargs = {"base_models": None, "datasets": None, "license": None, "eval_results": []}
    readme = Path(folder) / "README.md"
    if readme.is_file():
        card = ModelCard.load(readme)
        data = card.data.to_dict()
        provenance = data.get("sphinx_mllm") or {}
        bases = data.get("base_model")
        kwargs.update(
            base_models=[bases] if isinstance(bases, str) else bases,
            datasets=data.get("datasets"),
            license=data.get("license"),
            eval_results=[
                {field: getattr(result, field) for field in EVAL_RESULT_FIELDS if getattr(result, field) is not None}
                for result in card.data.eval_results or []
            ],
        )
    return provenance, kwargs
