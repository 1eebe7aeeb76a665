"""SPHINX model: an LLM reading fused CLIP / ConvNeXt / DINOv2 tokens and BLIP-2 Q-Former queries.

Per view the LLM sees `[start_img, Q-Former queries, fused tokens, end_img]`; views are ordered global first,
then the crops row-major, and every view of every image goes through each encoder in one batched call. The
view construction reproduces the original LLaMA2-Accessory code exactly, including its float16 round trips
(see `SphinxModel.cut_views`).

This file is copied flat into saved model folders as remote code: it imports only its sibling
`configuration_sphinx`.
"""

import functools
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation import StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils import is_torchdynamo_compiling, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_sphinx import SphinxConfig

try:
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast, MultimodalCausalLMOutputWithPast
except ImportError:  # transformers 5.19 and older (serving engines pin them) have no multimodal outputs yet

    @dataclass
    class MultimodalBaseModelOutputWithPast(BaseModelOutputWithPast):
        image_outputs: BaseModelOutputWithPooling | None = None

    @dataclass
    class MultimodalCausalLMOutputWithPast(CausalLMOutputWithPast):
        image_outputs: BaseModelOutputWithPooling | None = None


logger = logging.get_logger(__name__)

# The KV cache's argument and output field: `cache` in the newest transformers, `past_key_values` in 5.19 and older
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def takes_cache(removed_in: str):
    """Accept the cache as `cache=`. With the newest transformers `past_key_values=` still works and warns that
    it goes in version `removed_in`; 5.19 and older, whose own generation loop passes `past_key_values=`, have
    it renamed silently."""

    def decorate(function):
        if CACHE == "cache":
            return deprecate_kwarg("past_key_values", removed_in, new_name="cache")(function)

        @functools.wraps(function)
        def renamed(*args, **kwargs):
            if "past_key_values" in kwargs:
                kwargs["cache"] = kwargs.pop("past_key_values")
            return function(*args, **kwargs)

        return renamed

    return decorate


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONVNEXT_INPUT_FROM_VIEW = 256  # the original feeds ConvNeXt each 224-px view resized (nearest) to 256 px


# BLIP-2's vision config defaults to initializer_range=1e-10 (its weights were only ever loaded), which leaves a
# randomly initialised tower blind to its input; random SPHINX models initialise it like the other encoders.
QFORMER_VISION_INIT_STD = 0.02


@dataclass
class SphinxModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    r"""
    image_outputs (`BaseModelOutputWithPooling`, *optional*):
        What `get_image_features` returned: `pooler_output` holds the visual tokens of the images,
        `(num_images, num_image_tokens, hidden_size)`, start/end embeddings included.
    router_logits (`tuple(torch.FloatTensor)`, *optional*):
        Per-layer router logits of a mixture-of-experts LLM (SPHINX-MoE), with `output_router_logits=True`.
    """

    router_logits: tuple[torch.FloatTensor, ...] | None = None

    @property
    def image_hidden_states(self) -> torch.FloatTensor | None:
        """The visual tokens of the images (`image_outputs.pooler_output`)."""
        return None if self.image_outputs is None else self.image_outputs.pooler_output


@dataclass
class SphinxCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    image_outputs (`BaseModelOutputWithPooling`, *optional*):
        What `get_image_features` returned: `pooler_output` holds the visual tokens of the images.
    aux_loss (`torch.FloatTensor`, *optional*):
        The mixture-of-experts load-balancing loss (SPHINX-MoE, `output_router_logits=True`); `loss` includes it
        times `text_config.router_aux_loss_coef`.
    router_logits (`tuple(torch.FloatTensor)`, *optional*):
        Per-layer router logits of a mixture-of-experts LLM.
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None

    @property
    def image_hidden_states(self) -> torch.FloatTensor | None:
        """The visual tokens of the images (`image_outputs.pooler_output`)."""
        return None if self.image_outputs is None else self.image_outputs.pooler_output


def hub_kernels_requested_by_environment() -> bool:
    """Whether the environment asks for Hub kernels: transformers' own switch, `USE_HUB_KERNELS`, set to yes."""
    return os.environ.get("USE_HUB_KERNELS", "").strip().upper() in ("1", "ON", "YES", "TRUE", "Y")


def context_length(text_config) -> int | None:
    """Positions the LLM can attend over: `max_position_embeddings`, or what its RoPE scaling extends it to.

    Linear, YaRN, LLaMA-3 and LongRoPE scaling stretch `original_max_position_embeddings` (or
    `max_position_embeddings`) by `factor`; dynamic NTK scaling has no fixed limit (`None`).
    """
    limit = text_config.max_position_embeddings
    rope = getattr(text_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return limit
    if rope_type == "dynamic":
        return None
    original = rope.get("original_max_position_embeddings") or limit
    return max(limit, int(original * (rope.get("factor") or 1.0)))


def visual_share(input_ids: torch.Tensor | None, config) -> str:
    """The words ` (N of them visual tokens)` for the row of `input_ids` with the most image placeholders, for
    errors about positions (nothing without `input_ids`)."""
    if input_ids is None:
        return ""
    return f" ({int((input_ids == config.image_token_id).sum(-1).max())} of them visual tokens)"


def cached_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> int:
    """How many leading `input_ids` a cache passed to `generate` already holds.

    As `generate` reads them: with an attention mask longer than `input_ids`, the ids are only the new ones;
    otherwise they are the whole sequence, and the first `cache.get_seq_length()` of them are in the cache.
    """
    if cache is None or (attention_mask is not None and attention_mask.shape[1] != input_ids.shape[1]):
        return 0
    return cache.get_seq_length()


def resize_through_float16(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize normalised pixels the way the original does: in float16, no antialias, back to the input dtype."""
    return F.interpolate(images.half(), size=(size, size), mode=mode).to(images.dtype)


def cut_crops(images: torch.Tensor, grid: int, size: int) -> list[torch.Tensor]:
    """The `grid x grid` crops of side `size`, row-major."""
    return [
        images[..., y * size : (y + 1) * size, x * size : (x + 1) * size] for y in range(grid) for x in range(grid)
    ]


def create_timm_encoder(config) -> nn.Module:
    """A timm trunk without classifier or pooling: token features for ViTs, the normed map for ConvNeXt."""
    # imported here: timm imports wandb and torchvision's datasets where installed (seconds), which the commands
    # that never build a model (mix, extract-lora, push) would pay on every start
    import timm

    return timm.create_model(
        config.architecture, pretrained=False, num_classes=0, global_pool="", **(config.model_args or {})
    )


class SphinxQFormer(nn.Module):
    """BLIP-2 vision tower + Q-Former, giving the outputs of the learned queries (`get_qformer_features`)."""

    def __init__(self, config):
        super().__init__()
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(config.qformer_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        # every image token is attended to; an all-ones mask would give the same outputs, after a check of it that
        # reads it back from the device
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state


class SeparatorStoppingCriteria(StoppingCriteria):
    """Stops a row once its generated ids end with one of the token sequences (SPHINX's `\\n###`)."""

    def __init__(self, sequences: list[list[int]]):
        self.sequences = [torch.tensor(seq, dtype=torch.long) for seq in sequences if seq]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for seq in self.sequences:
            if input_ids.shape[1] >= len(seq):
                done |= (input_ids[:, -len(seq) :] == seq.to(input_ids.device)).all(dim=1)
        return done


class SphinxPreTrainedModel(PreTrainedModel):
    config: SphinxConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # the forward with a cache and no pixels (generation's repeated step) and the prefill with images compile with
    # no graph break: checks that read values on the device run only in eager mode (see `SphinxModel.forward`)
    _can_compile_fullgraph = True
    _skip_keys_device_placement = ["past_key_values"]
    # Raw timm blocks contribute nothing to the aggregated list: each SphinxModel names the blocks it has.
    _no_split_modules = []
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with Hub kernels off unless asked for.

        transformers kernelizes by default: on CUDA it replaces layers with compiled code downloaded from the Hub
        at first use, which fails offline and runs code nobody asked for. Here `use_kernels` defaults to False,
        or to True where the environment sets `USE_HUB_KERNELS=YES`; `use_kernels=True` asks for them.
        """
        kwargs.setdefault("use_kernels", hub_kernels_requested_by_environment())
        # loading replaces the parameters created in __init__, so the freeze is applied again afterwards
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        base = model if isinstance(model, SphinxModel) else model.model
        base.freeze_vision_encoders()
        return loaded

    def set_attn_implementation(self, attn_implementation):
        """A name applies to the LLM and the Q-Former's BLIP-2 towers, the models that have attention settings.
        Passed on as it is, transformers would also set it on the timm encoders' configs and on BLIP-2's own
        config and unused language-model config, warning for each that it found no model for it."""
        if not isinstance(attn_implementation, str):
            return super().set_attn_implementation(attn_implementation)
        name, qformer = attn_implementation, self.config.qformer_config
        per_config = {"": name, "text_config": name}
        if qformer is None:
            return super().set_attn_implementation(per_config)
        towers = {"": qformer._attn_implementation, "vision_config": name, "qformer_config": name}
        try:
            return super().set_attn_implementation(per_config | {"qformer_config": towers})
        except ValueError:  # transformers 5.19 and older take no nested settings: BLIP-2's configs are named whole
            return super().set_attn_implementation(per_config | {"qformer_config": name})

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SphinxModel):
            # the original initialises the boundary embeddings with torch.rand
            init.uniform_(module.start_img)
            init.uniform_(module.end_img)
        elif isinstance(module, SphinxQFormer):
            init.normal_(module.query_tokens, std=QFORMER_VISION_INIT_STD)
            # runs after the tower's own BLIP-2 init (children first), replacing its 1e-10 weights
            embeddings = module.vision_model.embeddings
            init.trunc_normal_(embeddings.class_embedding, std=QFORMER_VISION_INIT_STD)
            init.trunc_normal_(embeddings.position_embedding, std=QFORMER_VISION_INIT_STD)
            for layer in module.vision_model.modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    init.normal_(layer.weight, std=QFORMER_VISION_INIT_STD)
                    if layer.bias is not None:
                        init.zeros_(layer.bias)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=checkpoint, every_n_layers: int = 1
    ):
        """transformers' checkpointing for the LLM and BLIP-2 layers, timm's for the encoders that train."""
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        base = self if isinstance(self, SphinxModel) else self.model
        for encoder in (base.clip, base.convnext, base.dinov2):
            if encoder is not None:
                encoder.set_grad_checkpointing(enable and not self.config.freeze_vision_encoders)


class SphinxModel(SphinxPreTrainedModel):
    # a saved folder holds the LM head too; serving engines load the folder as `AutoModel` (this class) first
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: SphinxConfig):
        super().__init__(config)
        if not config.has_fused_encoder:
            raise ValueError("SphinxConfig needs at least one of clip_config, convnext_config or dinov2_config")
        hidden_size = config.text_config.hidden_size
        eps = config.projector_layer_norm_eps
        self.clip = create_timm_encoder(config.clip_config) if config.clip_config is not None else None
        self.convnext = create_timm_encoder(config.convnext_config) if config.convnext_config is not None else None
        self.dinov2 = create_timm_encoder(config.dinov2_config) if config.dinov2_config is not None else None
        self.qformer = SphinxQFormer(config.qformer_config) if config.qformer_config is not None else None
        if self.qformer is not None:
            self.qformer_proj = nn.Sequential(
                nn.Linear(config.qformer_config.qformer_config.hidden_size, hidden_size),
                nn.LayerNorm(hidden_size, eps),
            )
        fused_width = sum(e.num_features for e in (self.clip, self.convnext, self.dinov2) if e is not None)
        self.visual_proj = nn.Sequential(nn.Linear(fused_width, hidden_size), nn.LayerNorm(hidden_size, eps))
        self.start_img = nn.Parameter(torch.rand(1, 1, hidden_size))
        self.end_img = nn.Parameter(torch.rand(1, 1, hidden_size))
        self.language_model = AutoModel.from_config(config.text_config)
        self._dinov2_affine: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see `to_dinov2_statistics`
        self._kept_features: OrderedDict | None = None  # see `keep_frozen_features`
        self._max_kept_images = 0
        self._no_split_modules = self.encoder_block_classes()
        self.freeze_vision_encoders()
        self.post_init()

    def encoder_block_classes(self) -> list[str]:
        """Class names of the encoders' repeated blocks, for `device_map` and FSDP's transformer auto-wrap.

        Only blocks this model has: naming an absent class makes accelerate's auto-wrap fail.
        """
        blocks = [e.blocks[0] for e in (self.clip, self.dinov2) if e is not None]
        if self.convnext is not None:
            blocks.append(self.convnext.stages[0].blocks[0])
        names = sorted({type(block).__name__ for block in blocks})
        if self.qformer is not None:
            names += ["Blip2EncoderLayer", "Blip2QFormerLayer"]
        return names

    def freeze_vision_encoders(self):
        """Stop gradients into the encoders when the config says they are frozen (the SPHINX default)."""
        if self.config.freeze_vision_encoders:
            for encoder in self.vision_encoders():
                encoder.requires_grad_(False)

    def vision_encoders(self) -> list[nn.Module]:
        return [e for e in (self.qformer, self.clip, self.convnext, self.dinov2) if e is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_vision_encoders:
            for encoder in self.vision_encoders():
                encoder.eval()
        return self

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def cut_views(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Views of each image, image-major and global first: `(views, convnext_views)`.

        `views` (`[N * V, 3, view_size, view_size]`) feed CLIP, DINOv2 and the BLIP-2 tower. `convnext_views`
        are the ConvNeXt inputs when ConvNeXt has views of its own (`convnext_view_size`), else `None`.

        As in the original: a view that needs resizing is resized bicubically in float16; crops are cut from
        the input when it has exactly the size of the crop grid, otherwise from a float16 bicubic resize; the
        ConvNeXt global view always passes through float16 (the original resizes it even when the size does
        not change).
        """
        config = self.config
        side = pixel_values.shape[-1]
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[-2] != side:
            raise ValueError(f"pixel_values must be [num_images, 3, H, W] with H == W, got {list(pixel_values.shape)}")
        if side != config.image_size:
            raise ValueError(f"pixel_values are {side}x{side} px but this model expects {config.image_size} px")

        def views_at(size: int, always_resize_global: bool) -> torch.Tensor:
            if side == size and not always_resize_global:
                global_view = pixel_values
            else:
                global_view = resize_through_float16(pixel_values, size, "bicubic")
            if config.crop_grid == 1:
                return global_view
            grid_side = size * config.crop_grid
            source = pixel_values if side == grid_side else resize_through_float16(pixel_values, grid_side, "bicubic")
            views = torch.stack([global_view, *cut_crops(source, config.crop_grid, size)], dim=1)
            return views.flatten(0, 1)

        views = views_at(config.view_size, always_resize_global=False)
        convnext_views = None
        if self.convnext is not None and config.convnext_view_size is not None:
            convnext_views = views_at(config.convnext_view_size, always_resize_global=True)
        return views, convnext_views

    def convnext_tokens(self, views: torch.Tensor, convnext_views: torch.Tensor | None = None) -> torch.Tensor:
        """ConvNeXt's tokens of `views`: `[N * V, 1 + grid_side**2, C]`, the mean token, then the map row-major.

        `views` and `convnext_views` are what `cut_views` returns; without `convnext_views`, ConvNeXt reads
        `views` resized (nearest, in float16) to 256 px, as the original. A map smaller than the token grid is
        duplicated up to it.
        """
        if convnext_views is None:
            convnext_views = resize_through_float16(views, CONVNEXT_INPUT_FROM_VIEW, "nearest")
        feature_map = self.convnext(convnext_views.to(self.convnext.stem[0].weight.dtype))
        grid_side = self.config.grid_side
        if feature_map.shape[-1] != grid_side:
            if grid_side % feature_map.shape[-1]:
                raise ValueError(f"ConvNeXt map of side {feature_map.shape[-1]} cannot fill a {grid_side} grid")
            factor = grid_side // feature_map.shape[-1]
            feature_map = feature_map.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
        tokens = feature_map.flatten(-2).transpose(1, 2)
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """Encode images into the visual tokens the LLM reads.

        Returns a `BaseModelOutputWithPooling` (a tuple with `return_dict=False`):
        - `pooler_output`: the visual tokens per image, `[num_images, num_image_tokens, hidden_size]`, start/end
          embeddings included, in the order the LLM sees them;
        - `last_hidden_state`: the fused CLIP ‖ ConvNeXt ‖ DINOv2 features of every view before projection,
          `[num_images * num_views, 1 + grid_side**2, fused_width]`;
        - `hidden_states` (with `output_hidden_states=True`): each encoder's features of every view before fusion,
          in fusion order (CLIP, ConvNeXt, DINOv2), then the Q-Former query outputs.

        The encoders are timm trunks that do not return attention weights, so `output_attentions=True` raises.
        """
        if output_attentions:
            raise ValueError(
                "SPHINX's vision encoders (timm CLIP, ConvNeXt and DINOv2 trunks) do not return attention weights; "
                "register forward hooks on model.model.<encoder>.blocks to inspect them"
            )
        num_images = pixel_values.shape[0]
        encoder_dtype = next(self.visual_proj.parameters()).dtype  # PEFT may wrap the Sequential
        if self._kept_features is None or is_torchdynamo_compiling():
            per_encoder, queries = self.encode_views(pixel_values, encoder_dtype)
        else:
            per_encoder, queries = self._kept_or_encoded(pixel_values, encoder_dtype)
        fused = torch.cat([f.to(encoder_dtype) for f in per_encoder], dim=-1)
        tokens = [self.visual_proj(fused)]
        if queries is not None:
            tokens.insert(0, self.qformer_proj(queries.to(encoder_dtype)))
        per_view = tokens[0].shape[0]
        tokens = [self.start_img.expand(per_view, -1, -1), *tokens, self.end_img.expand(per_view, -1, -1)]
        image_tokens = torch.cat(tokens, dim=1).reshape(num_images, -1, self.config.text_config.hidden_size)
        hidden_states = None
        if output_hidden_states:
            hidden_states = (*per_encoder, queries) if queries is not None else tuple(per_encoder)
        return BaseModelOutputWithPooling(
            last_hidden_state=fused, pooler_output=image_tokens, hidden_states=hidden_states
        )

    def encode_views(self, pixel_values: torch.Tensor, encoder_dtype: torch.dtype) -> tuple[list, torch.Tensor | None]:
        """Each encoder's features of every view of `pixel_values`, in fusion order, and the Q-Former's queries
        (`None` without a Q-Former): what `get_image_features` fuses and projects."""
        views, convnext_views = self.cut_views(pixel_values)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision_encoders):
            per_encoder = []
            if self.clip is not None:
                per_encoder.append(self.clip.forward_features(views.to(encoder_dtype)))
            if self.convnext is not None:
                per_encoder.append(self.convnext_tokens(views, convnext_views))
            if self.dinov2 is not None:
                per_encoder.append(self.dinov2.forward_features(self.to_dinov2_statistics(views).to(encoder_dtype)))
            queries = self.qformer(views) if self.qformer is not None else None
        return per_encoder, queries

    def keep_frozen_features(self, max_images: int):
        """Keep the frozen encoders' features of up to `max_images` images between calls (0: keep none, the
        default), the least recently used dropped first.

        Frozen encoders give an image the same features every time, so training many epochs over a small image
        set (the demo's 1,600 images, 1,200 steps of 16) need not run them, nor cut the views, more than once per
        image. An image is known by its pixel values (their bytes, hashed on the CPU), so any processor or
        augmentation may feed it. The features stay on the device they were computed on. Calling this again
        empties the store; do so after changing the encoders' weights or dtype in place. Refused when the
        encoders are trained (`freeze_vision_encoders` false). Not for FSDP or DeepSpeed ZeRO-3, whose ranks must
        run the encoders together (a rank that skips them would wait for the others forever); the trainer
        (`feature_cache_size`) refuses FSDP and DeepSpeed at any stage, as it does not read the ZeRO stage.
        """
        if max_images < 0:
            raise ValueError(f"max_images must be 0 or more, got {max_images}")
        if max_images and not self.config.freeze_vision_encoders:
            raise ValueError(
                "the vision encoders are trained (freeze_vision_encoders: false), so their features change every "
                "step and cannot be kept; freeze them or keep none"
            )
        self._kept_features = OrderedDict() if max_images else None
        self._max_kept_images = max_images

    def _kept_or_encoded(
        self, pixel_values: torch.Tensor, encoder_dtype: torch.dtype
    ) -> tuple[list, torch.Tensor | None]:
        """`encode_views` of `pixel_values`, running the encoders only on the images not kept yet."""
        kept = self._kept_features
        context = (encoder_dtype, pixel_values.dtype, tuple(pixel_values.shape[1:]), str(pixel_values.device))
        on_host = pixel_values.detach().contiguous().cpu()
        # SHA-256 rather than BLAKE2: CPUs with SHA extensions (x86 since Zen and Ice Lake, ARMv8) hash it about
        # 1.5x as fast, and the hashing is part of every training step (16 images of 224 px: 5.1 ms against 7.8)
        keys = [(context, hashlib.sha256(image.view(torch.uint8).numpy()).digest()) for image in on_host]
        found = {key: kept[key] for key in keys if key in kept}
        missing = list(dict.fromkeys(key for key in keys if key not in found))
        if missing:
            indices = [keys.index(key) for key in missing]
            per_encoder, queries = self.encode_views(pixel_values[indices], encoder_dtype)
            views = per_encoder[0].shape[0] // len(missing)
            for position, key in enumerate(missing):
                part = slice(position * views, (position + 1) * views)
                found[key] = (
                    [f[part].clone() for f in per_encoder],
                    None if queries is None else queries[part].clone(),
                )
                kept[key] = found[key]
        for key in dict.fromkeys(keys):
            kept.move_to_end(key)
        while len(kept) > self._max_kept_images:
            kept.popitem(last=False)
        entries = [found[key] for key in keys]
        per_encoder = [torch.cat([features[n] for features, _ in entries]) for n in range(len(entries[0][0]))]
        queries = None if entries[0][1] is None else torch.cat([q for _, q in entries])
        return per_encoder, queries

    def to_dinov2_statistics(self, views: torch.Tensor) -> torch.Tensor:
        """DINOv2's input: CLIP-normalised pixels re-normalised to ImageNet statistics, with the original's formula.

        `views` are normalised with the CLIP mean and std (what the processor gives); the result is what
        ImageNet normalisation of the same pixels gives, up to rounding. The formula's constants are made once per
        dtype and device: making them copies four small tensors to the device, each a wait for it.
        """
        key = (views.dtype, views.device)
        affine = None if is_torchdynamo_compiling() else self._dinov2_affine.get(key)
        if affine is None:
            clip_mean, clip_std, mean, std = (
                torch.tensor(v, dtype=views.dtype, device=views.device).view(3, 1, 1)
                for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, IMAGENET_MEAN, IMAGENET_STD)
            )
            affine = (clip_std / std, (clip_mean - mean) / std)
            if not is_torchdynamo_compiling():
                self._dinov2_affine[key] = affine
        scale, shift = affine
        return views * scale + shift

    def check_positions(self, input_ids, inputs_embeds, position_ids=None, cache=None):
        """Refuse a forward that reaches past the LLM's context (`context_length`).

        The bound is per sequence: serving engines pack several sequences into one row, each with its own
        positions, so with `position_ids` the furthest position counts, not the row's length. Reading the
        positions synchronises with the device, so `forward` skips this under `torch.compile`.
        """
        context = context_length(self.config.text_config)
        if context is None:
            return
        if position_ids is not None:
            needed = int(position_ids.max()) + 1 if position_ids.numel() else 0
        else:
            needed = int(cache.get_seq_length() if cache is not None else 0) + inputs_embeds.shape[1]
        if needed > context:
            raise ValueError(
                f"the sequence needs {needed} positions{visual_share(input_ids, self.config)} but the model's "
                f"context length is {context}; shorten the prompt or extend the context with RoPE scaling "
                "(text_config.rope_parameters)"
            )

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features) -> torch.BoolTensor:
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            is_image = (inputs_embeds == image_embedding).all(-1)
        else:
            is_image = input_ids == self.config.image_token_id
        if not is_torchdynamo_compiling():  # counting the placeholders synchronises with the device
            n_tokens, n_features = int(is_image.sum()), image_features.shape[0] * image_features.shape[1]
            if n_tokens != n_features:
                raise ValueError(
                    f"Image features and image tokens do not match: the text has {n_tokens} image tokens, the "
                    f"{image_features.shape[0]} image(s) give {n_features} ({self.config.num_image_tokens} per image)"
                )
        return is_image.unsqueeze(-1).expand_as(inputs_embeds)

    @can_return_tuple
    @takes_cache("5.40.0")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> tuple | SphinxModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        # these checks read values on the device, which a compiled graph cannot; `generate` checks the positions
        # once per call
        if not is_torchdynamo_compiling():
            self.check_positions(input_ids, inputs_embeds, position_ids, cache)
        image_outputs = None
        if pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, return_dict=True)
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)
        elif (
            cache is None
            and input_ids is not None
            and not is_torchdynamo_compiling()
            and (input_ids == self.config.image_token_id).any()
        ):
            # inside `generate` a cache is always given, and a draft model of assisted decoding reads the prompt
            # without pixels: transformers passes pixels to the main model only (see `generate`)
            raise ValueError("the text has image tokens but no pixel_values were given")
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            return_dict=True,
            **{CACHE: cache},
            **kwargs,
        )
        return SphinxModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE: getattr(outputs, CACHE)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
            router_logits=getattr(outputs, "router_logits", None),
        )


class SphinxForConditionalGeneration(SphinxPreTrainedModel, GenerationMixin):
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: SphinxConfig):
        super().__init__(config)
        self.model = SphinxModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> tuple | BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def keep_frozen_features(self, max_images: int):
        self.model.keep_frozen_features(max_images)

    keep_frozen_features.__doc__ = SphinxModel.keep_frozen_features.__doc__

    @can_return_tuple
    @takes_cache("5.40.0")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple | SphinxCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, kept, :])
        loss = None
        if labels is not None:
            # visual positions are inputs, never targets
            labels = labels.masked_fill(labels == self.config.image_token_id, -100)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        aux_loss = None
        if outputs.router_logits is not None:
            text = self.config.text_config
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, text.num_local_experts, text.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                loss = loss + text.router_aux_loss_coef * aux_loss.to(loss.device)
        return SphinxCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{CACHE: getattr(outputs, CACHE)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            router_logits=outputs.router_logits,
        )

    def _images_past_cache(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, cached_length: int):
        """The images of `pixel_values` whose placeholders lie past the first `cached_length` ids (`None` if none).

        `pixel_values` holding every image of `input_ids` (in the order of their placeholders, row by row, as the
        processor gives them) lose those the cache holds; any other count is taken as the images past the cache,
        for the model to check against their placeholders.
        """
        per_image = self.config.num_image_tokens
        is_image = input_ids == self.config.image_token_id
        cached_tokens = is_image[:, :cached_length].sum(dim=1)
        if (cached_tokens % per_image).any():
            raise ValueError(
                f"the cache ends inside an image's {per_image} placeholder tokens: continue from a cache that holds "
                "whole images"
            )
        cached_images = (cached_tokens // per_image).tolist()
        row_images = (is_image.sum(dim=1) // per_image).tolist()
        if pixel_values.shape[0] != sum(row_images):
            return pixel_values
        keep, first = [], 0
        for cached, total in zip(cached_images, row_images, strict=True):
            keep.extend(range(first + cached, first + total))
            first += total
        return pixel_values[keep] if keep else None

    def _fit_into_context(self, kwargs: dict, generation_config, input_ids: torch.Tensor | None):
        """What the eager forward checks at every step, checked once per call, so that the step that generation
        repeats reads nothing back from the device and compiles whole: the prompt must fit the LLM's context, and
        `max_new_tokens` is cut to the room left, so a long request ends at the context with its text instead of
        failing after generating it."""
        context = context_length(self.config.text_config)
        if context is None:
            return
        embeds, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
        prompt = embeds.shape[1] if embeds is not None else input_ids.shape[1] if input_ids is not None else 0
        if mask is not None:  # a continuation gives only the new ids, with a mask over the whole sequence
            prompt = max(prompt, mask.shape[1])
        if prompt > context:
            raise ValueError(
                f"the prompt needs {prompt} positions{visual_share(input_ids, self.config)} but the model's context "
                f"length is {context}; shorten the prompt or extend the context with RoPE scaling "
                "(text_config.rope_parameters)"
            )
        room = context - prompt + 1  # the last generated token is never fed back, so it needs no position
        requested = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
        if requested is None:
            requested = kwargs.get("max_length", generation_config.max_length) - prompt
        if requested > room:
            logger.warning(
                f"max_new_tokens={requested} would run past the model's context of {context} positions (the prompt "
                f"takes {prompt}): generating at most {room} new tokens"
            )
            kwargs["max_new_tokens"] = room

    @takes_cache("6.0.0")
    def generate(self, *args, stopping_criteria: StoppingCriteriaList | None = None, **kwargs):
        """`GenerationMixin.generate`, stopping each row at SPHINX's turn separator.

        The separator (`\n###`) spans several tokens, so it cannot be an `eos_token_id`; its token sequences
        are read from `generation_config.separator_token_ids` (written by the processor-aware tools that
        save models) and a `separator_token_ids=[]` argument turns the stop off. The separator's last piece,
        which saved folders list among the `eos_token_id`s for serving engines, ends nothing here on its own.

        Assisted decoding (`assistant_model=`) works with any draft that shares the tokenizer; transformers gives
        the draft no pixels, so a SPHINX draft reads the `<image>` placeholders as plain embeddings. The result is
        the main model's own (greedy: identical tokens); only the share of accepted draft tokens depends on it.

        Generation continues from a `cache=` of an earlier call (e.g. `return_dict_in_generate=True`'s
        `out.cache`) with `input_ids` of the whole sequence, or only the new ids and an `attention_mask` over the
        whole sequence. The images whose placeholders the cache holds are not encoded again: `pixel_values` may
        be left out, hold every image of `input_ids`, or only the images of the ids past the cache.
        """
        generation_config = kwargs.get("generation_config") or self.generation_config
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(input_ids, torch.Tensor) and kwargs.get("inputs_embeds") is None:
            cached = cached_prefix_length(input_ids, kwargs.get("attention_mask"), kwargs.get("cache"))
            # transformers gives the first forward of a continuation the pixels too, but only the ids past the cache
            if kwargs.get("pixel_values") is not None and cached:
                kwargs["pixel_values"] = self._images_past_cache(kwargs["pixel_values"], input_ids, cached)
            if (
                not getattr(generation_config, "is_assistant", False)
                and kwargs.get("pixel_values") is None
                and (input_ids[:, cached:] == self.config.image_token_id).any()
            ):
                raise ValueError("the text has image tokens but no pixel_values were given")
        self._fit_into_context(kwargs, generation_config, input_ids if isinstance(input_ids, torch.Tensor) else None)
        saved = getattr(generation_config, "separator_token_ids", None) or []
        sequences = kwargs.pop("separator_token_ids", saved)
        if sequences:
            stopping_criteria = StoppingCriteriaList(stopping_criteria or [])
            stopping_criteria.append(SeparatorStoppingCriteria(sequences))
        ends, tails = generation_config.eos_token_id, {sequence[-1] for sequence in saved}
        if tails and isinstance(ends, list) and "eos_token_id" not in kwargs:  # the engines' stand-in for the stop
            kwargs["eos_token_id"] = [end for end in ends if end not in tails]
        if CACHE != "cache" and "cache" in kwargs:
            kwargs[CACHE] = kwargs.pop("cache")
        return super().generate(*args, stopping_criteria=stopping_criteria, **kwargs)


__all__ = ["SphinxPreTrainedModel", "SphinxModel", "SphinxForConditionalGeneration"]
