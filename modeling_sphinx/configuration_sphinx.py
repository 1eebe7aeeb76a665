"""SPHINX configuration.

Released SPHINX models differ only in data: the LLM, which vision encoders they use and how an image is cut
into views. `SPHINX_VARIANTS` holds that data for every release, each row built from how the release differs
from the first SPHINX, and `SphinxConfig.from_variant` turns a row into a config. The tiny presets keep the
token geometry (224-px views, 14-px patches, 32 query tokens) and shrink every width, so tests and demos
exercise the real code paths in seconds.

This file is copied flat into saved model folders as remote code: it imports nothing of this package.
"""

import copy
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers 5.19 and older (serving engines pin them): `sub_configs` and a manual conversion
    SubConfigSpec = None

# Released LLM sizes, each after the first by how it differs. The vocabulary is LLaMA's 32000 pieces plus the added
# `<image>` placeholder.
LLAMA_2_13B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "vocab_size": 32001,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-13b": LLAMA_2_13B,
    "tinyllama-1.1b": {
        **LLAMA_2_13B,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
    "mixtral-8x7b": {
        **LLAMA_2_13B,
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}

# Tiny stand-ins of the same families: small widths, the same key/value grouping where it is grouped; `vocab_size`
# is replaced by the tokenizer's size.
TINY_WIDTHS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-13b": {**LLAMA_2_13B, **TINY_WIDTHS, "num_key_value_heads": 4, "vocab_size": 1001},
    "tinyllama-1.1b": {**TEXT_PRESETS["tinyllama-1.1b"], **TINY_WIDTHS, "num_key_value_heads": 2, "vocab_size": 1001},
    "mixtral-8x7b": {
        **TEXT_PRESETS["mixtral-8x7b"],
        **TINY_WIDTHS,
        "intermediate_size": 96,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 4,
        "vocab_size": 1001,
    },
}

# Released encoders. CLIP keeps exact GELU: the original builds ViT-L-14 without pretrained weights, which
# gives open_clip's nn.GELU, and runs the OpenAI weights that way. DINOv2 runs at 224 px, so its position
# table has 16x16 + 1 rows (the converter bakes the original's resize of the 37x37 table into it).
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "clip": {"architecture": "vit_large_patch14_clip_224", "model_args": {}},
    "convnext": {"architecture": "convnext_xxlarge", "model_args": {}},
    "dinov2": {"architecture": "vit_giant_patch14_dinov2", "model_args": {"img_size": 224}},
    "qformer": {},  # transformers' Blip2Config defaults are BLIP-2 (OPT-2.7b): EVA ViT-g/14 + 12-layer Q-Former
}

TINY_ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "clip": {
        "architecture": "vit_large_patch14_clip_224",
        "model_args": {"embed_dim": 32, "depth": 1, "num_heads": 2},
    },
    "convnext": {"architecture": "convnext_xxlarge", "model_args": {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}},
    "dinov2": {
        "architecture": "vit_giant_patch14_dinov2",
        "model_args": {"img_size": 224, "embed_dim": 24, "depth": 1, "num_heads": 2},
    },
    "qformer": {
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        "qformer_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "encoder_hidden_size": 32,
        },
        "text_config": {"model_type": "opt", "hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 1},
    },
}

FUSED_ENCODERS = ("clip", "convnext", "dinov2")  # concatenated channel-wise, in this order
ALL_ENCODERS = ("qformer", *FUSED_ENCODERS)
LIGHT_ENCODERS = ("convnext", "dinov2")

# What a release row does not state: the first SPHINX's LLaMA-2-13B reading one 224-px view with all four encoders.
VARIANT_DEFAULTS: dict[str, Any] = {
    "text": "llama-2-13b",
    "encoders": ALL_ENCODERS,
    "image_size": 224,
    "crop_grid": 1,
    "convnext_view_size": None,
}


def _variant(llama_type: str, like: dict[str, Any] = VARIANT_DEFAULTS, **differences) -> dict[str, Any]:
    """A release row: `llama_type`, the model file of the original code it was made with, and how it differs
    from the row it is `like` (by default `VARIANT_DEFAULTS`)."""
    return {**like, "llama_type": llama_type, **differences}


# the "-1k" releases cut a 2 x 2 grid of sub-images from an input twice the side of their single-view sibling
_SPHINX_1K = _variant(llama_type="llama_ens5", image_size=448, crop_grid=2)
_SPHINX_TINY = _variant(
    llama_type="llama_ens_light",
    text="tinyllama-1.1b",
    encoders=LIGHT_ENCODERS,
    image_size=512,
    convnext_view_size=512,
)
_SPHINX_MOE = _variant(llama_type="mixtral_sparse_ens", text="mixtral-8x7b", image_size=512, convnext_view_size=512)

SPHINX_VARIANTS: dict[str, dict[str, Any]] = {
    "sphinx": _variant(llama_type="llama_ens"),
    "sphinx-1k": _SPHINX_1K,
    # SPHINX-V2-1k is sphinx-1k's architecture trained on more data: the two differ in their weights only
    "sphinx-v2-1k": dict(_SPHINX_1K),
    "sphinx-2k": _variant(llama_type="llama_ens10", image_size=672, crop_grid=3),
    "sphinx-tiny": _SPHINX_TINY,
    "sphinx-tiny-1k": _variant(llama_type="llama_ens5_light", like=_SPHINX_TINY, image_size=1024, crop_grid=2),
    "sphinx-moe": _SPHINX_MOE,
    "sphinx-moe-1k": _variant(llama_type="mixtral_sparse_ens5", like=_SPHINX_MOE, image_size=1024, crop_grid=2),
}


@strict
class SphinxVisionEncoderConfig(PreTrainedConfig):
    r"""
    A timm vision encoder of SPHINX (CLIP ViT, ConvNeXt or DINOv2).

    architecture (`str`):
        The timm model name, e.g. `"vit_large_patch14_clip_224"`.
    model_args (`dict`, *optional*):
        Keyword arguments for `timm.create_model` that override the architecture's defaults (widths, depths,
        `img_size`).
    """

    model_type = "sphinx_vision_encoder"

    architecture: str = "vit_large_patch14_clip_224"
    model_args: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, encoder: str | None = None, **kwargs):
        """Load an encoder config, from its own folder or from a SPHINX model folder.

        A SPHINX folder holds one config per encoder; `encoder` (`"clip"`, `"convnext"` or `"dinov2"`) picks one,
        and may be left out only when the folder holds a single encoder.
        """
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == SphinxConfig.model_type:
            present = [name for name in FUSED_ENCODERS if config_dict.get(f"{name}_config")]
            if encoder is None and len(present) == 1:
                encoder = present[0]
            if encoder not in present:
                raise ValueError(
                    f"{pretrained_model_name_or_path!r} is a SPHINX model with the encoders {present}; pass "
                    f"encoder= one of them to load its config (got {encoder!r})"
                )
            config_dict = config_dict[f"{encoder}_config"]
        elif encoder is not None:
            raise ValueError(f"encoder={encoder!r} picks an encoder of a SPHINX model folder; this is not one")
        return cls.from_dict(config_dict, **kwargs)


@strict
class SphinxConfig(PreTrainedConfig):
    r"""
    Configuration of a SPHINX model: an LLM that reads, right after BOS, the visual tokens of every view of
    every image.

    text_config (`dict` or `PreTrainedConfig`):
        The decoder (LLaMA for SPHINX and SPHINX-Tiny, Mixtral for SPHINX-MoE).
    clip_config, convnext_config, dinov2_config (`SphinxVisionEncoderConfig`, *optional*):
        The timm encoders whose token features are concatenated channel-wise (CLIP ‖ ConvNeXt ‖ DINOv2). A
        missing one is left out of the concatenation.
    qformer_config (`Blip2Config`, *optional*):
        BLIP-2 vision tower + Q-Former whose query outputs are projected into tokens of their own.
    image_size (`int`):
        Side of the square image the processor produces.
    view_size (`int`):
        Side of each view fed to CLIP, DINOv2 and the BLIP-2 tower.
    crop_grid (`int`):
        Number of sub-image rows (and columns). 1 means a single global view; `g > 1` gives a global view plus
        `g * g` crops in row-major order.
    convnext_view_size (`int`, *optional*):
        `None`: ConvNeXt reads each view resized (nearest) to 256 px and its 8x8 map is duplicated to 16x16.
        An int: ConvNeXt has views of its own at this size (SPHINX-Tiny and SPHINX-MoE use 512).
    image_token_id (`int`):
        Id of the `<image>` placeholder that the processor expands and the model fills with visual tokens.
    projector_layer_norm_eps (`float`):
        Epsilon of the LayerNorm after each projection.
    freeze_vision_encoders (`bool`):
        Run the encoders without gradients and in eval mode, as SPHINX does.
    variant (`str`, *optional*):
        Name of the release this config was made from.
    patch_size (`int`):
        Side of the encoders' patches: 14 for every release (CLIP ViT-L/14, DINOv2 ViT-g/14, EVA ViT-g/14). It
        sets the token grid of a view (`view_size // patch_size` a side); the miniature's encoders use 28.
    """

    model_type = "sphinx"
    # sub-config: (config class, default model type of an AutoConfig one, optional)
    _SUB_CONFIGS = {
        "text_config": (AutoConfig, "llama", False),
        "clip_config": (SphinxVisionEncoderConfig, None, True),
        "convnext_config": (SphinxVisionEncoderConfig, None, True),
        "dinov2_config": (SphinxVisionEncoderConfig, None, True),
        "qformer_config": (AutoConfig, "blip-2", True),
    }
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            name: SubConfigSpec(config_class=cls, model_type=model_type, optional=optional)
            for name, (cls, model_type, optional) in _SUB_CONFIGS.items()
        }
    else:
        sub_configs = {name: cls for name, (cls, _, _) in _SUB_CONFIGS.items()}

    text_config: dict | PreTrainedConfig | None = None
    clip_config: dict | PreTrainedConfig | None = None
    convnext_config: dict | PreTrainedConfig | None = None
    dinov2_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    image_size: int = 224
    view_size: int = 224
    crop_grid: int = 1
    convnext_view_size: int | None = None
    image_token_id: int = 32000
    projector_layer_norm_eps: float = 1e-5
    freeze_vision_encoders: bool = True
    variant: str | None = None
    tie_word_embeddings: bool = False
    patch_size: int = 14

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None:
            self._build_sub_configs()
        super().__post_init__(**kwargs)
        if self.crop_grid < 1:
            raise ValueError(f"crop_grid must be >= 1, got {self.crop_grid}")
        if self.view_size % self.patch_size:
            raise ValueError(f"view_size {self.view_size} is not a multiple of the {self.patch_size}-px patch")

    def _build_sub_configs(self):
        """What transformers 5.20+ does from `sub_configs_defaults`: dicts become configs, a missing LLM config
        becomes the default LLaMA one."""
        from transformers import CONFIG_MAPPING

        for name, (cls, model_type, optional) in self._SUB_CONFIGS.items():
            value = getattr(self, name)
            if value is None and not optional:
                value = {}
            if isinstance(value, dict):
                if cls is AutoConfig:
                    value = CONFIG_MAPPING[value.get("model_type", model_type)](**value)
                else:
                    value = cls(**value)
                setattr(self, name, value)

    @property
    def num_views(self) -> int:
        return 1 if self.crop_grid == 1 else 1 + self.crop_grid**2

    @property
    def grid_side(self) -> int:
        """Side of the patch grid of one view: 16 for 224-px views."""
        return self.view_size // self.patch_size

    @property
    def num_query_tokens(self) -> int:
        return self.qformer_config.num_query_tokens if self.qformer_config is not None else 0

    @property
    def has_fused_encoder(self) -> bool:
        return any(c is not None for c in (self.clip_config, self.convnext_config, self.dinov2_config))

    @property
    def tokens_per_view(self) -> int:
        """`[start_img, Q-Former queries, class row + grid rows, end_img]`: 291, or 259 without Q-Former."""
        fused = self.grid_side**2 + 1 if self.has_fused_encoder else 0
        return 2 + self.num_query_tokens + fused

    @property
    def num_image_tokens(self) -> int:
        return self.num_views * self.tokens_per_view

    @classmethod
    def from_variant(cls, name: str, tiny: bool = False, **overrides) -> "SphinxConfig":
        """Config of a released SPHINX model (`tiny=True`: same geometry, small random-sized widths).

        `overrides` replace top-level fields; give `text_config` as a dict to change LLM fields only.
        """
        if name not in SPHINX_VARIANTS:
            raise ValueError(f"unknown SPHINX variant {name!r}; known: {', '.join(SPHINX_VARIANTS)}")
        row = SPHINX_VARIANTS[name]
        text_presets = TINY_TEXT_PRESETS if tiny else TEXT_PRESETS
        encoder_presets = TINY_ENCODER_PRESETS if tiny else ENCODER_PRESETS
        text_config = copy.deepcopy(text_presets[row["text"]])
        text_config.update(overrides.pop("text_config", {}))
        fields = {f"{encoder}_config": copy.deepcopy(encoder_presets[encoder]) for encoder in row["encoders"]}
        if "qformer_config" in fields:
            fields["qformer_config"]["model_type"] = "blip-2"
        fields.update(
            text_config=text_config,
            image_size=row["image_size"],
            crop_grid=row["crop_grid"],
            convnext_view_size=row["convnext_view_size"],
            image_token_id=text_config["vocab_size"] - 1,
            variant=name,
        )
        fields.update(overrides)
        return cls(**fields)


__all__ = ["SphinxConfig", "SphinxVisionEncoderConfig", "SPHINX_VARIANTS"]
