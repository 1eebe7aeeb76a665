"""Assemble and save complete SPHINX model folders (weights, processor, generation config, remote code)."""

from pathlib import Path

import torch
from transformers import GenerationConfig

from .configuration_sphinx import SphinxConfig
from .folders import atomic_output_dir
from .modeling_sphinx import SphinxForConditionalGeneration
from .processing.image_processing_sphinx import SphinxImageProcessor
from .processing.processing_sphinx import SphinxProcessor
from .processing.tasks_sphinx import CHAT_TEMPLATE
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
    """Greedy decoding that stops at the turn separator and never emits the `<image>` placeholder."""
    tokenizer = processor.tokenizer
    return GenerationConfig(
        max_new_tokens=512,
        do_sample=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[config.image_token_id],
        separator_token_ids=processor.separator_token_ids(),
    )


def save_model_folder(
    model: SphinxForConditionalGeneration, processor: SphinxProcessor, out_dir, provenance: dict, **save_kwargs
):
    """Write model, processor, remote code and model card into `out_dir` atomically (`AutoModel` exposed too)."""
    from .card import write_model_card

    model.config.auto_map = {"AutoModel": "modeling_sphinx.SphinxModel"}
    with atomic_output_dir(out_dir) as staging:
        model.save_pretrained(staging, **save_kwargs)
        processor.save_pretrained(staging)
        write_model_card(staging, provenance)
    return Path(out_dir)


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
