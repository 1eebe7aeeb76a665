"""Assemble and save complete SPHINX model folders (weights, processor, generation config, remote code)."""

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from ..configuration_sphinx import SphinxConfig
from ..modeling_sphinx import SphinxForConditionalGeneration
from ..processing.image_processing_sphinx import SphinxImageProcessor
from ..processing.processing_sphinx import SphinxProcessor
from ..processing.tasks_sphinx import CHAT_TEMPLATE, SEPARATOR
from .atomic import atomic_output_dir
from .shards import refuse_non_finite
from .tokenizer import tiny_tokenizer, tokenizer_from_sentencepiece


def build_processor(config: SphinxConfig, tokenizer) -> SphinxProcessor:
    size = {"height": config.image_size, "width": config.image_size}
    return SphinxProcessor(
        image_processor=SphinxImageProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=config.num_image_tokens,
    )


def build_generation_config(config: SphinxConfig, processor: SphinxProcessor) -> GenerationConfig:
    """Greedy decoding that stops at the turn separator and never emits the `<image>` placeholder.

    Serving engines (vLLM, SGLang) read only `eos_token_id` of this file, so when the separator ends in one
    `###` piece (LLaMA's and the miniature's tokenizers), that piece is an end-of-turn id there too: a served
    answer stops at it. `generate` itself stops at the whole separator, as the original does.
    """
    tokenizer = processor.tokenizer
    separators = processor.separator_token_ids()
    marker = SEPARATOR.lstrip("\n")
    turn_ends = sorted({s[-1] for s in separators if tokenizer.convert_ids_to_tokens(s[-1]) == marker})
    return GenerationConfig(
        max_new_tokens=512,
        do_sample=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, *turn_ends] if turn_ends else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[config.image_token_id],
        separator_token_ids=separators,
    )


def write_model_folder(
    out_dir,
    model: SphinxForConditionalGeneration,
    processor: SphinxProcessor,
    provenance: dict,
    write_weights: Callable[[Path], None],
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete model folder into `out_dir` atomically, whatever makes the weights.

    `write_weights(folder)` writes the safetensors; `model` gives everything else: the config (with `auto_map`,
    `AutoModel` exposed too, and `architectures`), the remote code and the generation config. A meta-device
    model will do when `write_weights` streams the tensors. `check(folder)` runs on the complete folder before
    it becomes `out_dir`; if it raises, nothing is left behind.
    """
    from .card import write_model_card

    model.config.auto_map = {"AutoModel": "modeling_sphinx.SphinxModel"}
    model.config.architectures = [type(model).__name__]
    # the tokenizer's padding id, so that `Trainer` finds nothing to realign (and says nothing) when tuning starts
    model.config.text_config.pad_token_id = processor.tokenizer.pad_token_id
    needed = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    with atomic_output_dir(out_dir, needed_bytes=needed) as staging:
        write_weights(staging)
        custom_object_save(model, staging, config=model.config)
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_model_card(staging, provenance)
        if check is not None:
            check(staging)
    return Path(out_dir)


def save_model_folder(
    model: SphinxForConditionalGeneration, processor: SphinxProcessor, out_dir, provenance: dict, **save_kwargs
) -> Path:
    """Write `model` (with `save_pretrained(**save_kwargs)`), its processor, remote code and card to `out_dir`;
    a model with NaN or infinite weights (a diverged run) is refused, naming the tensor, and nothing is written."""
    for name, tensor in model.state_dict().items():
        refuse_non_finite(name, tensor, f"{out_dir} was not written (a diverged run? lower the learning rate)")
    # save_pretrained writes the config and remote code too; write_model_folder writes them again as for any folder
    return write_model_folder(
        out_dir, model, processor, provenance, lambda folder: model.save_pretrained(folder, **save_kwargs)
    )


def init_model(variant: str, out_dir, tiny: bool = False, tokenizer_model=None, seed: int = 0, **overrides):
    """Write a randomly initialised SPHINX model of `variant` with its processor to `out_dir`.

    Tiny models get a deterministic tokenizer trained offline; full-size models need the release's
    SentencePiece `tokenizer_model` (LLaMA-2's, or Mixtral's for the MoE variants).
    """
    if tokenizer_model is not None:
        tokenizer = tokenizer_from_sentencepiece(tokenizer_model)
    elif tiny:
        tokenizer = tiny_tokenizer()
    else:
        raise ValueError("a full-size model needs the release's tokenizer.model (--tokenizer PATH)")
    text_config = {"vocab_size": len(tokenizer), **overrides.pop("text_config", {})}
    config = SphinxConfig.from_variant(variant, tiny=tiny, text_config=text_config, **overrides)
    config.image_token_id = tokenizer.image_token_id
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    torch.manual_seed(seed)
    model = SphinxForConditionalGeneration(config).eval()
    processor = build_processor(config, tokenizer)
    model.generation_config = build_generation_config(config, processor)
    return save_model_folder(model, processor, out_dir, provenance={"kind": "initialised"})
