"""The calls a serving engine's Transformers backend makes (vLLM 0.32-0.33), made here with transformers alone.

vLLM encodes the images itself (`get_image_features(...).pooler_output`, `num_image_tokens` rows an image),
merges them into `inputs_embeds`, packs every scheduled sequence into one row with per-sequence `position_ids`,
and calls the base model without pixels, without a cache and with `return_dict=False`, attention going
through a function it registers (its paged kernel, which keeps the sequences apart).
"""

import pytest
import torch
from PIL import Image
from transformers import AttentionInterface, AutoModel, AutoProcessor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .conftest import IMAGES


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    folder = tiny_model_dir("sphinx-tiny")
    return AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def _prompt_with_image(processor, question: str):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=prompt, images=Image.open(IMAGES / "chelsea.png"), return_tensors="pt")


def test_packed_sequences_with_merged_embeddings_match_each_sequence_alone(served):
    model, processor = served
    with_image = _prompt_with_image(processor, "What is it?")
    ids = with_image["input_ids"][0]
    embed = model.get_input_embeddings()
    with torch.no_grad():
        visual = model.get_image_features(with_image["pixel_values"]).pooler_output
        assert visual.shape[:2] == (1, processor.num_image_tokens)
        merged = embed(ids).masked_scatter((ids == processor.image_token_id)[:, None], visual[0])
    text_only = torch.randint(5, 200, (11,), generator=torch.Generator().manual_seed(0))
    pieces = [merged, embed(text_only)]
    starts = [0, len(ids), len(ids) + len(text_only)]
    calls = []

    def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        calls.append((module.layer_idx, set(kwargs)))
        outputs = [
            sdpa_attention_forward(
                module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, scaling=scaling, is_causal=True
            )[0]
            for a, b in zip(starts[:-1], starts[1:], strict=True)
        ]
        return torch.cat(outputs, dim=1), None

    AttentionInterface.register("sphinx_packed_test", packed_attention)
    model.set_attn_implementation("sphinx_packed_test")
    try:
        with torch.no_grad():
            packed = torch.cat(pieces)[None]
            positions = torch.cat([torch.arange(len(piece)) for piece in pieces])[None]
            output = model(inputs_embeds=packed, position_ids=positions, use_cache=False, return_dict=False)
    finally:
        model.set_attn_implementation("sdpa")
    assert isinstance(output, tuple) and output[0].shape == packed.shape
    layers = model.config.text_config.num_hidden_layers
    assert [layer for layer, _ in calls] == list(range(layers))
    assert all(isinstance(layer, int) and "position_ids" in kwargs for layer, kwargs in calls)
    with torch.no_grad():
        alone = [
            model(input_ids=with_image["input_ids"], pixel_values=with_image["pixel_values"]).last_hidden_state[0],
            model(input_ids=text_only[None]).last_hidden_state[0],
        ]
    for sequence, a, b in zip(alone, starts[:-1], starts[1:], strict=True):
        assert torch.allclose(output[0][0, a:b], sequence, atol=1e-5)


def test_processor_reports_each_image_and_its_token_count(served):
    model, processor = served
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Two?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [Image.open(IMAGES / "chelsea.png"), Image.open(IMAGES / "coffee.png")]
    out = processor(text=prompt, images=images, return_text_replacement_offsets=True)
    offsets = out["text_replacement_offsets"][0]
    assert len(offsets) == 2
    counted = processor._get_num_multimodal_tokens(image_sizes=[image.size[::-1] for image in images])
    with torch.no_grad():
        rows = model.get_image_features(processor(images=images, return_tensors="pt")["pixel_values"]).pooler_output
    assert counted.num_image_tokens == [rows.shape[1]] * 2 == [processor.num_image_tokens] * 2
