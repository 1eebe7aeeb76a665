"""Model cards rendered from the repository's `model_card.md` template with huggingface_hub's `ModelCard`.

Facts come from the model folder's `config.json` and from how the model was made (`provenance`); facts we do
not know are left out, never invented.
"""

import json
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = Path(__file__).resolve().parent / "model_card.md"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
LLM_NAMES = {
    ("llama", 5120, 40): "LLaMA-2-13B",
    ("llama", 2048, 22): "TinyLlama-1.1B",
    ("mixtral", 4096, 32): "Mixtral-8x7B",
}
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


def _encoder_name(name: str, sub_config: dict) -> str:
    if name == "qformer":
        released = sub_config.get("vision_config", {}).get("hidden_size") == 1408 and (
            sub_config.get("qformer_config", {}).get("hidden_size") == 768
        )
    else:
        released = not {k: v for k, v in (sub_config.get("model_args") or {}).items() if k != "img_size"}
    return ENCODER_NAMES[name] if released else f"{ENCODER_NAMES[name]} architecture at reduced size"


def _describe(config: dict) -> dict:
    text = config["text_config"]
    layers, hidden = text["num_hidden_layers"], text["hidden_size"]
    known = LLM_NAMES.get((text["model_type"], hidden, layers))
    llm = known or f"{text['model_type']} decoder, {layers} layers of width {hidden} (not a released size)"
    encoders = [
        _encoder_name(name, config[f"{name}_config"]) for name in ENCODER_NAMES if config.get(f"{name}_config")
    ]
    grid = config.get("crop_grid", 1)
    num_views = 1 if grid == 1 else 1 + grid * grid
    has_qformer = bool(config.get("qformer_config"))
    num_query_tokens = config["qformer_config"].get("num_query_tokens", 32) if has_qformer else 0
    view_size = config.get("view_size", 224)
    tokens_per_view = 2 + num_query_tokens + ((view_size // 14) ** 2 + 1)
    return {
        "variant": config.get("variant"),
        "llm": llm,
        "encoders": ", ".join(encoders),
        "has_qformer": has_qformer,
        "num_query_tokens": num_query_tokens,
        "image_size": config.get("image_size"),
        "view_size": view_size,
        "num_views": num_views,
        "num_crops": num_views - 1,
        "num_image_tokens": num_views * tokens_per_view,
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
    """The card of the model in `folder`; `base_models` keeps only Hub repo ids (local paths are omitted)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    facts = _describe(config)
    hub_bases = [b for b in base_models or [] if hub_reference(b)]
    results = [EvalResult(task_type="image-text-to-text", **row) for row in eval_results or []]
    model_name = repo_id.split("/")[-1] if repo_id else (facts["variant"] or Path(folder).name)
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
