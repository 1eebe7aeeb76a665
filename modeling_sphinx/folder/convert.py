"""Convert original LLaMA2-Accessory SPHINX checkpoints into Hugging Face folders.

An original release folder holds `consolidated.XX-of-NN.model.pth` (one per tensor-parallel rank, each
`{"model": {"llma.<key>": tensor}}`), `config.json` (the model arguments, `null` where unset), `meta.json`
(`{"llama_type": ...}`, naming the model file) and `tokenizer.model`.

Conversion, one output tensor at a time from memory-mapped shards:
1. merge the tensor-parallel pieces (column-parallel on dim 0, row-parallel and the embedding on dim 1,
   MoE experts expert-major), checking that replicated tensors agree across shards;
2. rename with `KEY_RULES` (one declarative table) and apply the per-tensor transforms: the RoPE q/k row
   permutation (interleaved → rotate-half), CLIP's class/position embeddings to timm's shapes, DINOv2's
   518-px position table resized to the 224-px grid exactly as the original does at run time, Mixtral experts
   fused into transformers' `gate_up_proj`/`down_proj`, one row added for `<image>`;
3. drop what the original never uses (`DROPPED_KEYS`: CLIP's text side and `visual.proj`, DINOv2's
   `mask_token`);
4. stream them into sharded safetensors, and write the folder around them with `build.write_model_folder`,
   as `init` does (config, generation config, processor, remote code, card, renamed into place only when
   everything succeeded).

Encoders of other sizes than the releases (the parity fixtures shrink them) are described by
`encoder_sizes`, a dict in the original's own terms (the `size_changes_vs_real_model` format).
"""

import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..configuration_sphinx import ENCODER_PRESETS, SPHINX_VARIANTS, SphinxConfig
from ..modeling_sphinx import SphinxForConditionalGeneration
from .create import build_generation_config, build_processor, write_model_folder
from .dtypes import dtype_named
from .shards import StreamingShardWriter, parse_size
from .tokenizer import tokenizer_from_sentencepiece

COLUMN, ROW, EMBEDDING, EXPERTS, REPLICATED = "column", "row", "embedding", "experts", "replicated"
SPLIT_DIM = {COLUMN: 0, ROW: 1, EMBEDDING: 1}
ORIGINAL_PREFIX = "llma."
SHARD_NAME = re.compile(r"consolidated\.(\d+)-of-(\d+)\.model\.pth")
DINOV2_INTERPOLATE_OFFSET = 0.1  # the DINOv2 hub code's `interpolate_offset`


@dataclass(frozen=True)
class KeyRule:
    """Original key (regex, without `llma.`) → our key; how shards split it; an optional transform."""

    original: str
    ours: str
    split: str = REPLICATED
    transform: str | None = None
    part: int = 0  # position of this source among the sources of a fused target


_LAYER = r"layers\.(\d+)\."
_LM = r"model.language_model.layers.\1."
KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule(r"tok_embeddings\.weight", "model.language_model.embed_tokens.weight", EMBEDDING, "add_image_row"),
    KeyRule(_LAYER + r"attention\.wq\.weight", _LM + "self_attn.q_proj.weight", COLUMN, "rope_permute_q"),
    KeyRule(_LAYER + r"attention\.wk\.weight", _LM + "self_attn.k_proj.weight", COLUMN, "rope_permute_k"),
    KeyRule(_LAYER + r"attention\.wv\.weight", _LM + "self_attn.v_proj.weight", COLUMN),
    KeyRule(_LAYER + r"attention\.wo\.weight", _LM + "self_attn.o_proj.weight", ROW),
    KeyRule(_LAYER + r"feed_forward\.w1\.weight", _LM + "mlp.gate_proj.weight", COLUMN),
    KeyRule(_LAYER + r"feed_forward\.w3\.weight", _LM + "mlp.up_proj.weight", COLUMN),
    KeyRule(_LAYER + r"feed_forward\.w2\.weight", _LM + "mlp.down_proj.weight", ROW),
    KeyRule(_LAYER + r"feed_forward\.w1", _LM + "mlp.experts.gate_up_proj", EXPERTS, "fuse_experts", 0),
    KeyRule(_LAYER + r"feed_forward\.w3", _LM + "mlp.experts.gate_up_proj", EXPERTS, "fuse_experts", 1),
    KeyRule(_LAYER + r"feed_forward\.w2", _LM + "mlp.experts.down_proj", EXPERTS, "experts_down"),
    KeyRule(_LAYER + r"feed_forward\.gate\.weight", _LM + "mlp.gate.weight"),
    KeyRule(_LAYER + r"attention_norm\.weight", _LM + "input_layernorm.weight"),
    KeyRule(_LAYER + r"ffn_norm\.weight", _LM + "post_attention_layernorm.weight"),
    KeyRule(r"norm\.weight", "model.language_model.norm.weight"),
    KeyRule(r"output\.weight", "lm_head.weight", COLUMN, "add_zero_row"),
    KeyRule(r"(start_img|end_img)", r"model.\1"),
    KeyRule(r"(qformer_proj|visual_proj)\.(\d)\.(weight|bias)", r"model.\1.\2.\3"),
    KeyRule(r"qformer\.(.+)", r"model.qformer.\1"),
    KeyRule(r"clip\.visual\.class_embedding", "model.clip.cls_token", transform="as_token"),
    KeyRule(r"clip\.visual\.positional_embedding", "model.clip.pos_embed", transform="as_token"),
    KeyRule(r"clip\.visual\.conv1\.weight", "model.clip.patch_embed.proj.weight"),
    KeyRule(r"clip\.visual\.ln_pre\.(weight|bias)", r"model.clip.norm_pre.\1"),
    KeyRule(r"clip\.visual\.ln_post\.(weight|bias)", r"model.clip.norm.\1"),
    KeyRule(r"clip\.visual\.transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)", r"model.clip.blocks.\1.norm1.\2"),
    KeyRule(r"clip\.visual\.transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)", r"model.clip.blocks.\1.norm2.\2"),
    KeyRule(
        r"clip\.visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
        r"model.clip.blocks.\1.attn.qkv.\2",
    ),
    KeyRule(
        r"clip\.visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)",
        r"model.clip.blocks.\1.attn.proj.\2",
    ),
    KeyRule(
        r"clip\.visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"model.clip.blocks.\1.mlp.fc1.\2"
    ),
    KeyRule(
        r"clip\.visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"model.clip.blocks.\1.mlp.fc2.\2"
    ),
    KeyRule(r"openclip_convnext_xxl\.(.+)", r"model.convnext.\1"),
    KeyRule(r"dinov2_vitg14\.pos_embed", "model.dinov2.pos_embed", transform="dinov2_pos_embed"),
    KeyRule(r"dinov2_vitg14\.blocks\.(\d+)\.mlp\.w12\.(weight|bias)", r"model.dinov2.blocks.\1.mlp.fc1.\2"),
    KeyRule(r"dinov2_vitg14\.blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"model.dinov2.blocks.\1.mlp.fc2.\2"),
    KeyRule(r"dinov2_vitg14\.(.+)", r"model.dinov2.\1"),
)
DROPPED_KEYS = re.compile(
    r"clip\.visual\.proj|clip\.(token_embedding|positional_embedding|ln_final|text_projection|logit_scale|transformer)"
    r"(\..*)?|dinov2_vitg14\.mask_token"
)
_COMPILED = [(re.compile(rule.original + "$"), rule) for rule in KEY_RULES]


def match_rule(original_key: str) -> tuple[str, KeyRule] | None:
    """Our key and the rule for an original key (without `llma.`); `None` for unknown keys."""
    for pattern, rule in _COMPILED:
        match = pattern.match(original_key)
        if match:
            return match.expand(rule.ours), rule
    return None


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as it is; the message names the file, key or shape."""


def llm_ffn_width(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The original FeedForward width rule: 2/3 of 4·dim, times the multiplier, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def text_config_from_original(params: dict, llama_type: str, vocab_size: int) -> dict:
    """Our `text_config` fields from the original `config.json` (`null` fields take the original defaults)."""
    dim, n_heads = params["dim"], params["n_heads"]
    fields = {
        "hidden_size": dim,
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "rms_norm_eps": params.get("norm_eps") or 1e-5,
        "vocab_size": vocab_size + 1,
        # the original loader ignores config.json's max_seq_len and uses 4096
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(params.get("rope_theta") or 10000.0)},
    }
    if llama_type.startswith("mixtral"):
        moe = params.get("moe") or {}
        fields.update(
            intermediate_size=params["hidden_dim"],
            head_dim=params.get("head_dim") or dim // n_heads,
            num_local_experts=moe.get("num_experts", 8),
            num_experts_per_tok=moe.get("num_experts_per_tok", 2),
        )
    else:
        fields["intermediate_size"] = llm_ffn_width(
            dim, params.get("multiple_of") or 256, params.get("ffn_dim_multiplier")
        )
    if params.get("rope_scaling"):
        fields["rope_parameters"].update(rope_type="linear", factor=float(params["rope_scaling"]))
    return fields


def encoder_overrides(encoder_sizes: dict, encoders) -> dict:
    """Our encoder configs from encoder sizes in the original's terms (missing entries keep the releases')."""
    known = {"llm", "clip_ViT-L-14", "openclip_convnext_xxlarge", "timm_convnext_xxlarge", "dinov2_vit_giant2"}
    unknown = set(encoder_sizes) - known - {"blip2", "feature_widths"}
    if unknown:
        raise ConversionError(
            f"encoder sizes: unknown keys {sorted(unknown)}; known: {sorted(known | {'blip2', 'feature_widths'})}"
        )
    overrides = {}
    if "clip" in encoders and "clip_ViT-L-14" in encoder_sizes:
        vision = encoder_sizes["clip_ViT-L-14"].get("vision_cfg", {})
        args = {}
        if "width" in vision:
            args["embed_dim"] = vision["width"]
            args["num_heads"] = vision["width"] // vision.get("head_width", 64)
        if "layers" in vision:
            args["depth"] = vision["layers"]
        if "mlp_ratio" in vision:
            args["mlp_ratio"] = vision["mlp_ratio"]
        if vision.get("patch_size", 14) != 14 or vision.get("image_size", 224) != 224:
            raise ConversionError("encoder sizes: CLIP must keep 14-px patches at 224 px (the token geometry)")
        overrides["clip_config"] = {**ENCODER_PRESETS["clip"], "model_args": args}
    if "convnext" in encoders and "timm_convnext_xxlarge" in encoder_sizes:
        sizes = encoder_sizes["timm_convnext_xxlarge"]
        args = {k: list(sizes[k]) for k in ("depths", "dims") if k in sizes}
        overrides["convnext_config"] = {**ENCODER_PRESETS["convnext"], "model_args": args}
    if "dinov2" in encoders and "dinov2_vit_giant2" in encoder_sizes:
        sizes = encoder_sizes["dinov2_vit_giant2"]
        args = {"img_size": 224, **{k: sizes[k] for k in ("embed_dim", "depth", "num_heads") if k in sizes}}
        overrides["dinov2_config"] = {**ENCODER_PRESETS["dinov2"], "model_args": args}
    if "qformer" in encoders and "blip2" in encoder_sizes:
        blip2 = encoder_sizes["blip2"]
        overrides["qformer_config"] = {
            "model_type": "blip-2",
            "vision_config": dict(blip2.get("vision", {})),
            "qformer_config": dict(blip2.get("qformer", {})),
        }
    return overrides


def _check_feature_widths(skeleton: SphinxForConditionalGeneration, encoder_sizes: dict):
    """`feature_widths` of the encoder sizes against the widths of the encoders they built."""
    model = skeleton.model
    widths = {
        name: getattr(model, name).num_features for name in ("clip", "convnext", "dinov2") if getattr(model, name)
    }
    if model.qformer is not None:
        widths["qformer"] = model.qformer.query_tokens.shape[-1]
    for name, width in encoder_sizes.get("feature_widths", {}).items():
        if name in widths and widths[name] != width:
            raise ConversionError(f"encoder sizes: feature_widths.{name} is {width} but the sizes give {widths[name]}")


def resize_dinov2_pos_embed(pos_embed: torch.Tensor, grid_side: int) -> torch.Tensor:
    """The DINOv2 hub code's run-time resize: bicubic, scale factor `(grid + 0.1) / M`, no antialias, float32."""
    num_patches = pos_embed.shape[1] - 1
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ConversionError(f"DINOv2 pos_embed has {num_patches} patch rows, not a square grid")
    if side == grid_side:
        return pos_embed
    table = pos_embed.float()
    scale = (grid_side + DINOV2_INTERPOLATE_OFFSET) / side
    grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_side * grid_side, -1)
    return torch.cat([table[:, :1], grid], dim=1).to(pos_embed.dtype)


def rope_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Interleaved (complex-pair) RoPE rows → transformers' rotate-half layout."""
    rows, columns = weight.shape
    head_dim = rows // num_heads
    return weight.view(num_heads, head_dim // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def rope_unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    rows, columns = weight.shape
    head_dim = rows // num_heads
    return weight.view(num_heads, 2, head_dim // 2, columns).transpose(1, 2).reshape(rows, columns)


def _keep(tensor, config):
    return tensor


# Per-tensor transforms: name → (forward over the merged source parts, inverse for writing the original layout).
# The experts' inverse split happens in `_split`; DINOv2's table is written back at the 224-px grid.
TRANSFORMS = {
    None: (lambda parts, config: parts[0], _keep),
    "rope_permute_q": (
        lambda parts, config: rope_permute(parts[0], config.text_config.num_attention_heads),
        lambda tensor, config: rope_unpermute(tensor, config.text_config.num_attention_heads),
    ),
    "rope_permute_k": (
        lambda parts, config: rope_permute(parts[0], config.text_config.num_key_value_heads),
        lambda tensor, config: rope_unpermute(tensor, config.text_config.num_key_value_heads),
    ),
    # an input row for `<image>` that the visual tokens always replace
    "add_image_row": (
        lambda parts, config: torch.cat([parts[0], parts[0].float().mean(0, keepdim=True).to(parts[0].dtype)]),
        lambda tensor, config: tensor[:-1],
    ),
    # the head's `<image>` logit; generation also suppresses it
    "add_zero_row": (
        lambda parts, config: torch.cat([parts[0], parts[0].new_zeros(1, parts[0].shape[1])]),
        lambda tensor, config: tensor[:-1],
    ),
    "as_token": (
        lambda parts, config: parts[0].reshape(1, -1, parts[0].shape[-1]),
        lambda tensor, config: tensor.reshape(-1, tensor.shape[-1]) if tensor.shape[1] > 1 else tensor.reshape(-1),
    ),
    "dinov2_pos_embed": (lambda parts, config: resize_dinov2_pos_embed(parts[0], config.grid_side), _keep),
    # [E, ffn, dim] gate and up → transformers' [E, 2·ffn, dim]
    "fuse_experts": (lambda parts, config: torch.cat(parts, dim=1), _keep),
    # used as `x @ w2[e]` in the original → [E, dim, ffn]
    "experts_down": (lambda parts, config: parts[0].transpose(1, 2), lambda tensor, config: tensor.transpose(1, 2)),
}


REMAP_AFTER_BYTES = 256 * 2**20


@dataclass
class OriginalCheckpoint:
    folder: Path
    llama_type: str
    params: dict
    shard_paths: list[Path]
    shards: list[dict[str, torch.Tensor]]
    touched_bytes: int = 0

    def merged(self, key: str, split: str, num_experts: int) -> torch.Tensor:
        """The whole tensor of an original key (a new tensor), merged from the shards by its split rule."""
        pieces = [shard[key] for shard in self.shards]
        self.touched_bytes += sum(p.numel() * p.element_size() for p in pieces)
        if self.touched_bytes > REMAP_AFTER_BYTES:
            # pages read through the memory maps stay resident until the files are unmapped: map them anew
            self.shards = [_load_shard(path) for path in self.shard_paths]
            self.touched_bytes = 0
        if split == REPLICATED:
            for rank, piece in enumerate(pieces[1:], start=1):
                if piece.shape != pieces[0].shape or not torch.equal(piece, pieces[0]):
                    raise ConversionError(
                        f"{self.folder}: replicated tensor {key!r} differs between shard 0 and shard {rank}"
                    )
            return pieces[0].clone()
        if split == EXPERTS:  # each rank holds every expert's slice of the hidden width, expert-major
            return torch.cat([p.reshape(num_experts, -1, p.shape[-1]) for p in pieces], dim=1)
        return torch.cat(pieces, dim=SPLIT_DIM[split])


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path.parent}: missing {path.name}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None


def _shard_paths(folder: Path) -> list[Path]:
    found = {}
    counts = set()
    for path in folder.glob("consolidated.*.pth"):
        match = SHARD_NAME.fullmatch(path.name)
        if match is None:
            raise ConversionError(f"{path}: unexpected file name (expected consolidated.XX-of-NN.model.pth)")
        found[int(match.group(1))] = path
        counts.add(int(match.group(2)))
    if not found:
        raise ConversionError(f"{folder}: no consolidated.XX-of-NN.model.pth shards")
    if len(counts) != 1:
        raise ConversionError(f"{folder}: shard names disagree on the shard count: {sorted(counts)}")
    (count,) = counts
    missing = sorted(set(range(count)) - set(found))
    extra = sorted(set(found) - set(range(count)))
    if missing or extra:
        raise ConversionError(
            f"{folder}: the names say {count} shards; missing ranks {missing}"
            + (f", unexpected ranks {extra}" if extra else "")
        )
    return [found[rank] for rank in range(count)]


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        zipfile.ZipFile(path).close()  # a truncated .pth fails here with a clear cause
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (zipfile.BadZipFile, RuntimeError, OSError, EOFError) as error:
        raise ConversionError(
            f"{path}: cannot read the shard (truncated or not a torch checkpoint): {error}"
        ) from error
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a dict with a 'model' state dict")
    return {k.removeprefix(ORIGINAL_PREFIX): v for k, v in state.items()}


def read_original(folder: str | Path) -> OriginalCheckpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a folder")
    meta = _read_json(folder / "meta.json")
    llama_type = meta.get("llama_type")
    if llama_type not in {row["llama_type"] for row in SPHINX_VARIANTS.values()}:
        known = sorted({row["llama_type"] for row in SPHINX_VARIANTS.values()})
        raise ConversionError(f"{folder}/meta.json: unknown llama_type {llama_type!r}; known: {known}")
    params = _read_json(folder / "config.json")
    paths = _shard_paths(folder)
    shards = [_load_shard(path) for path in paths]
    reference = set(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != reference:
            raise ConversionError(
                f"{folder}: shard {rank} has different keys than shard 0: "
                f"only in shard 0 {sorted(reference - set(shard))[:10]}, only in shard {rank} {sorted(set(shard) - reference)[:10]}"
            )
    return OriginalCheckpoint(folder, llama_type, params, paths, shards)


def variant_of(llama_type: str) -> str:
    return next(name for name, row in SPHINX_VARIANTS.items() if row["llama_type"] == llama_type)


def sphinx_config_from_original(
    original: OriginalCheckpoint, vocab_size: int, encoder_sizes: dict | None
) -> SphinxConfig:
    variant = variant_of(original.llama_type)
    encoder_sizes = encoder_sizes or {}
    text = text_config_from_original(original.params, original.llama_type, vocab_size)
    llm_sizes = encoder_sizes.get("llm", {})
    for key, value in llm_sizes.items():
        if key in original.params and original.params[key] != value:
            raise ConversionError(f"encoder sizes: llm.{key} is {value} but config.json says {original.params[key]}")
    overrides = encoder_overrides(encoder_sizes, SPHINX_VARIANTS[variant]["encoders"])
    return SphinxConfig.from_variant(variant, text_config=text, image_token_id=vocab_size, **overrides)


def _plan(original: OriginalCheckpoint) -> dict[str, list[tuple[str, KeyRule]]]:
    """Our key → its original sources in part order; unknown keys are an error that lists them."""
    plan: dict[str, list[tuple[str, KeyRule]]] = {}
    unknown = []
    for key in original.shards[0]:
        if DROPPED_KEYS.fullmatch(key):
            continue
        matched = match_rule(key)
        if matched is None:
            unknown.append(key)
            continue
        ours, rule = matched
        plan.setdefault(ours, []).append((key, rule))
    if unknown:
        raise ConversionError(
            f"{original.folder}: unexpected keys (not part of {original.llama_type}): {sorted(unknown)}"
        )
    return {ours: sorted(sources, key=lambda s: s[1].part) for ours, sources in plan.items()}


def _produce(original, plan, ours, config):
    sources = plan[ours]
    experts = getattr(config.text_config, "num_local_experts", 1)
    parts = [original.merged(key, rule.split, experts) for key, rule in sources]
    forward, _ = TRANSFORMS[sources[0][1].transform]
    return forward(parts, config)


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    dtype: str = "bfloat16",
    verify: bool = False,
    max_shard_size: str | int = "5GB",
    encoder_sizes: dict | str | Path | None = None,
) -> Path:
    """Convert an original SPHINX release folder `src` into a Hugging Face model folder `out`."""
    torch_dtype = dtype_named(dtype)
    if isinstance(encoder_sizes, (str, Path)):
        if not Path(encoder_sizes).is_file():
            raise ConversionError(f"encoder sizes file {str(encoder_sizes)!r} does not exist")
        encoder_sizes = _read_json(Path(encoder_sizes))
    original = read_original(src)
    tokenizer = tokenizer_from_sentencepiece(Path(src) / "tokenizer.model")
    base_vocab = len(tokenizer) - 1
    config = sphinx_config_from_original(original, base_vocab, encoder_sizes)
    config.dtype = torch_dtype
    plan = _plan(original)
    try:
        with torch.device("meta"):
            skeleton = SphinxForConditionalGeneration(config)
    except (AssertionError, ValueError, RuntimeError) as error:
        raise ConversionError(
            f"{original.folder}: config.json and the encoder sizes do not make a valid model: {error}"
        ) from error
    _check_feature_widths(skeleton, encoder_sizes or {})
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(plan))
    if missing:
        raise ConversionError(f"{original.folder}: missing keys for {original.llama_type} (our names): {missing}")
    embedding_rows = original.shards[0]["tok_embeddings.weight"].shape[0]
    if embedding_rows != base_vocab:
        raise ConversionError(
            f"{original.folder}: tokenizer.model has {base_vocab} pieces but tok_embeddings has {embedding_rows} rows"
        )

    processor = build_processor(config, tokenizer)
    skeleton.generation_config = build_generation_config(config, processor)
    layout = {ours: (shape, torch_dtype) for ours, shape in expected.items()}

    def write_weights(folder: Path):
        with StreamingShardWriter(folder, layout, parse_size(max_shard_size)) as writer:
            for ours, shape in expected.items():
                tensor = _produce(original, plan, ours, config)
                if tuple(tensor.shape) != shape:
                    sources = [key for key, _ in plan[ours]]
                    raise ConversionError(
                        f"{original.folder}: {ORIGINAL_PREFIX}{sources[0]} gives {ours} of shape "
                        f"{list(tensor.shape)} but the config expects {list(shape)} (check config.json or "
                        "--encoder-sizes)"
                    )
                writer.write(ours, tensor.to(torch_dtype))

    provenance = {"kind": "converted", "source": Path(src).name, "llama_type": original.llama_type, "dtype": dtype}
    return write_model_folder(
        out,
        skeleton,
        processor,
        provenance,
        write_weights,
        check=(lambda folder: verify_conversion(original, plan, folder, dtype)) if verify else None,
    )


def verify_conversion(original: OriginalCheckpoint, plan, folder: Path, dtype: str):
    """Reload the written folder, compare every tensor with the source, and run one forward."""
    torch_dtype = dtype_named(dtype)
    model = SphinxForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype).eval()
    for ours, tensor in model.state_dict().items():
        expected = _produce(original, plan, ours, model.config).to(torch_dtype)
        if not torch.equal(tensor, expected):
            raise ConversionError(f"verify: {ours} in {folder} differs from the source")
    config = model.config
    ids = torch.tensor([[1] + [config.image_token_id] * config.num_image_tokens + [2]])
    pixels = torch.zeros(1, 3, config.image_size, config.image_size, dtype=torch_dtype)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits
    if not torch.isfinite(logits).all():
        raise ConversionError("verify: the converted model gives non-finite logits")


def write_original_checkpoint(model: SphinxForConditionalGeneration, folder: str | Path, num_shards: int = 1):
    """Write `model` in the original release layout (shards, config.json, meta.json; no tokenizer.model).

    The inverse of the conversion, for tests and benchmarks. The `<image>` rows are dropped and DINOv2's
    position table is written at 224 px (a real release has the 518-px table).
    """
    config = model.config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = config.text_config
    experts = getattr(text, "num_local_experts", None)
    state = model.state_dict()
    shards = [{} for _ in range(num_shards)]
    for ours, tensor in state.items():
        original_key, rule, tensor = _invert(ours, tensor, config)
        for key, value in _split(original_key, rule, tensor, num_shards):
            for rank in range(num_shards):
                shards[rank][ORIGINAL_PREFIX + key] = value[rank].clone()
    for rank, shard in enumerate(shards):
        torch.save({"model": shard}, folder / f"consolidated.{rank:02d}-of-{num_shards:02d}.model.pth")
    params = {
        "dim": text.hidden_size,
        "n_layers": text.num_hidden_layers,
        "n_heads": text.num_attention_heads,
        "n_kv_heads": text.num_key_value_heads,
        "vocab_size": text.vocab_size - 1,
        # multiple_of 1 and this multiplier make the original width rule give back intermediate_size
        "multiple_of": 1,
        "ffn_dim_multiplier": (text.intermediate_size + 0.5) / int(2 * 4 * text.hidden_size / 3),
        "norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"],
        "max_seq_len": 4096,
        "rope_scaling": None,
    }
    if experts:
        params.update(
            hidden_dim=text.intermediate_size,
            head_dim=text.head_dim,
            moe={"num_experts": experts, "num_experts_per_tok": text.num_experts_per_tok},
        )
    (folder / "config.json").write_text(json.dumps(params, indent=2))
    (folder / "meta.json").write_text(json.dumps({"llama_type": SPHINX_VARIANTS[config.variant]["llama_type"]}))


def _invert(ours: str, tensor: torch.Tensor, config):
    """The original key, its rule, and the tensor before the forward transform."""
    for rule in KEY_RULES:
        original_key = _original_key_for(rule, ours)
        if original_key is not None:
            break
    else:
        raise KeyError(ours)
    _, inverse = TRANSFORMS[rule.transform]
    tensor = inverse(tensor, config)
    return original_key, rule, tensor


def _original_key_for(rule: KeyRule, ours: str) -> str | None:
    """Invert one rule for one of our keys; `None` unless the forward mapping gives back exactly `ours`."""
    ours_pattern = re.sub(r"\\\\(\d)", "(.+?)", re.escape(rule.ours))
    match = re.fullmatch(ours_pattern, ours)
    if match is None:
        return None
    groups = iter(match.groups())
    original = re.sub(r"\([^()]*\)", lambda _: next(groups, ""), rule.original).replace("\\.", ".")
    return original if match_rule(original) == (ours, rule) else None


def _split(original_key: str, rule: KeyRule, tensor: torch.Tensor, num_shards: int):
    if rule.transform == "fuse_experts":
        gate, up = tensor.chunk(2, dim=1)
        stem = original_key.rsplit(".", 1)[0]
        return [
            (f"{stem}.w1", _split_experts(gate, num_shards)),
            (f"{stem}.w3", _split_experts(up, num_shards)),
        ]
    if rule.split == EXPERTS:
        return [(original_key, _split_experts(tensor, num_shards))]
    if rule.split == REPLICATED:
        return [(original_key, [tensor] * num_shards)]
    return [(original_key, list(tensor.chunk(num_shards, dim=SPLIT_DIM[rule.split])))]


def _split_experts(tensor: torch.Tensor, num_shards: int) -> list[torch.Tensor]:
    return [piece.reshape(-1, piece.shape[-1]) for piece in tensor.chunk(num_shards, dim=1)]
