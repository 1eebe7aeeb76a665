"""What transformers' own model tests check on the default path: one BOS, annotated call signatures, tuples, layouts,
assisted decoding, encoder configs and the context guard."""

import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_sphinx import (
    SphinxConfig,
    SphinxForConditionalGeneration,
    SphinxImageProcessor,
    SphinxImageProcessorPil,
    SphinxProcessor,
    SphinxVisionEncoderConfig,
)
from modeling_sphinx.folder.create import init_model

from .helpers import IMAGES, image_message


def _inputs(processor, text="<image>What is it?", image="chelsea.png"):
    return processor(text=text, images=Image.open(IMAGES / image), return_tensors="pt")


def test_rendered_prompt_passed_to_the_processor_keeps_one_bos(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir("sphinx"))
    bos = processor.tokenizer.bos_token_id
    messages = image_message("What is shown in this image?", path=IMAGES / "astronaut.png")
    one_step = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith(processor.tokenizer.bos_token)
    image = Image.open(IMAGES / "astronaut.png")
    two_step = processor(text=rendered, images=image, return_tensors="pt")
    collator_style = processor(text=[rendered], images=[image], return_tensors="pt", add_special_tokens=False)
    plain = processor(text=rendered[len("<s>") :], images=image, return_tensors="pt")
    for inputs in (two_step, collator_style, plain):
        ids = inputs["input_ids"][0]
        assert ids.tolist() == one_step["input_ids"][0].tolist()
        assert (ids == bos).sum() == 1 and ids[0] == bos
        assert torch.equal(inputs["pixel_values"], one_step["pixel_values"])


def test_processor_call_is_an_annotated_images_and_text_signature():
    signature = inspect.signature(SphinxProcessor.__call__)
    assert list(signature.parameters) == ["self", "images", "text", "kwargs"]
    assert all(
        p.annotation is not inspect.Parameter.empty for name, p in signature.parameters.items() if name != "self"
    )
    assert signature.return_annotation is not inspect.Signature.empty


@pytest.mark.parametrize("backend", [SphinxImageProcessor, SphinxImageProcessorPil])
def test_greyscale_arrays_and_tensors_in_every_layout(backend):
    image_processor = backend(size={"height": 224, "width": 224})
    grey = Image.open(IMAGES / "chelsea.png").convert("L")
    expected = image_processor(grey, return_tensors="pt")["pixel_values"]
    array = np.asarray(grey)
    layouts = {
        "HxWx1": array[..., None],
        "1xHxW": array[None],
        "HxWx1 tensor": torch.from_numpy(array.copy())[..., None],
        "1xHxW tensor": torch.from_numpy(array.copy())[None],
        "read-only HxWx1": np.broadcast_to(array[..., None], array.shape + (1,)),
    }
    for name, image in layouts.items():
        pixels = image_processor(image, return_tensors="pt")["pixel_values"]
        assert torch.equal(pixels, expected), name
    with pytest.raises(ValueError, match=r"1 \(grey\), 3 \(RGB\) or 4 \(RGBA\) channels, got shape \[20, 30, 2\]"):
        image_processor(np.zeros((20, 30, 2), dtype=np.uint8))


def test_return_dict_false_gives_tuples(tiny_model_dir):
    folder = tiny_model_dir("sphinx")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = _inputs(processor)
    with torch.no_grad():
        reference = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        base_tuple = model.model(**inputs, return_dict=False)
        model.config.return_dict = False
        from_config = model(**inputs)
    for output in (as_tuple, from_config):
        assert isinstance(output, tuple)
        assert torch.equal(output[0], reference.logits)
    assert isinstance(base_tuple, tuple) and base_tuple[0].shape[:2] == inputs["input_ids"].shape
    assert torch.equal(reference.image_hidden_states, reference.image_outputs.pooler_output)


def test_get_image_features_follows_the_vlm_contract(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("sphinx-1k")).eval()
    config = model.config
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        out = model.get_image_features(pixels, output_hidden_states=True)
        as_tuple = model.model.get_image_features(pixels, return_dict=False)
    views = 2 * config.num_views
    assert out.pooler_output.shape == (2, config.num_image_tokens, config.text_config.hidden_size)
    fused_width = sum(e.num_features for e in (model.model.clip, model.model.convnext, model.model.dinov2))
    assert out.last_hidden_state.shape == (views, config.grid_side**2 + 1, fused_width)
    clip, convnext, dinov2, queries = out.hidden_states
    assert torch.equal(torch.cat([clip, convnext, dinov2], dim=-1), out.last_hidden_state)
    assert queries.shape == (views, config.num_query_tokens, config.qformer_config.qformer_config.hidden_size)
    assert out.attentions is None
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
    assert torch.equal(as_tuple[1], out.pooler_output)
    with pytest.raises(ValueError, match="do not return attention weights"):
        model.get_image_features(pixels, output_attentions=True)


def test_assisted_decoding_gives_the_main_models_greedy_tokens(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("sphinx")
    draft_folder = init_model(
        "sphinx",
        tmp_path / "draft",
        tiny=True,
        seed=7,
        text_config={"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2},
    )
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    draft = AutoModelForImageTextToText.from_pretrained(draft_folder).eval()
    inputs = _inputs(processor, "<image>Describe it.")
    greedy = model.generate(**inputs, max_new_tokens=8, separator_token_ids=[])
    assisted = model.generate(**inputs, max_new_tokens=8, separator_token_ids=[], assistant_model=draft)
    assert assisted.tolist() == greedy.tolist()
    # a user's generate without pixels is still told what is missing
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model.generate(input_ids=inputs["input_ids"], max_new_tokens=2)


def _qformer_tokens(model, pixels):
    with torch.no_grad():
        tokens = model.model.get_image_features(pixels).pooler_output
    return tokens[:, 1 : 1 + model.config.num_query_tokens]


def test_random_qformer_sees_the_image():
    torch.manual_seed(0)
    model = SphinxForConditionalGeneration(SphinxConfig.from_variant("sphinx", tiny=True)).eval()
    processor = SphinxImageProcessor(size={"height": 224, "width": 224})
    pixels = processor([Image.open(IMAGES / n) for n in ("astronaut.png", "coffee.png")], return_tensors="pt")
    tokens = _qformer_tokens(model, pixels["pixel_values"])
    # with BLIP-2's initializer_range=1e-10 the two images gave tokens within 2e-7 of each other
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3
    tower = model.model.qformer.vision_model
    assert 0.01 < tower.encoder.layers[0].mlp.fc1.weight.std() < 0.03


def test_loading_does_not_reinitialise_loaded_weights(tiny_model_dir):
    folder = tiny_model_dir("sphinx")
    first = AutoModelForImageTextToText.from_pretrained(folder)
    second = AutoModelForImageTextToText.from_pretrained(folder)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_gradient_checkpointing_reaches_trainable_timm_encoders():
    torch.manual_seed(0)
    config = SphinxConfig.from_variant("sphinx", tiny=True, freeze_vision_encoders=False)
    model = SphinxForConditionalGeneration(config).train()
    model.activation_checkpointing_enable()
    encoders = (model.model.clip, model.model.dinov2)
    assert all(e.grad_checkpointing for e in encoders)
    assert all(stage.grad_checkpointing for stage in model.model.convnext.stages)
    calls = []
    # a pre-hook: the recomputation stops early, before the block's forward returns
    model.model.clip.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    n = config.num_image_tokens
    ids = torch.tensor([[1] + [config.image_token_id] * n + [5, 6, 7]])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 224, 224), labels=ids)
    out.loss.backward()
    assert len(calls) == 2, "a checkpointed block runs again in the backward pass"
    assert model.model.clip.blocks[0].attn.qkv.weight.grad is not None
    model.activation_checkpointing_disable()
    assert not any(e.grad_checkpointing for e in encoders)

    frozen = SphinxForConditionalGeneration(SphinxConfig.from_variant("sphinx", tiny=True))
    frozen.activation_checkpointing_enable()
    assert not frozen.model.clip.grad_checkpointing  # frozen encoders run without gradients anyway


@pytest.mark.parametrize(
    "rope,allowed",
    [
        ({"rope_type": "default", "rope_theta": 10000.0}, False),
        ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, True),
        ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, True),
        (
            {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 512},
            True,
        ),
    ],
)
def test_context_guard_follows_rope_scaling(rope, allowed):
    text = {"max_position_embeddings": 512, "rope_parameters": rope}
    config = SphinxConfig.from_variant("sphinx", tiny=True, text_config=text)
    model = SphinxForConditionalGeneration(config).eval()
    n = config.num_image_tokens
    ids = torch.tensor([[1] + [config.image_token_id] * n + [5] * 400])  # 692 positions
    pixels = torch.zeros(1, 3, 224, 224)
    if allowed:
        with torch.no_grad():
            assert model(input_ids=ids, pixel_values=pixels).logits.shape[1] == ids.shape[1]
    else:
        with pytest.raises(ValueError, match=r"692 positions \(291 of them visual tokens\).* context length is 512"):
            model(input_ids=ids, pixel_values=pixels)
    if rope["rope_type"] == "linear":
        too_long = torch.tensor([[1] + [config.image_token_id] * n + [5] * 800])
        with pytest.raises(ValueError, match="context length is 1024"):
            model(input_ids=too_long, pixel_values=pixels)


def test_vision_encoder_config_from_a_sphinx_folder(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("sphinx")
    config = SphinxConfig.from_pretrained(folder)
    for name in ("clip", "convnext", "dinov2"):
        loaded = SphinxVisionEncoderConfig.from_pretrained(folder, encoder=name)
        assert loaded.architecture == getattr(config, f"{name}_config").architecture
        assert loaded.model_args == getattr(config, f"{name}_config").model_args
    with pytest.raises(ValueError, match=r"encoders \['clip', 'convnext', 'dinov2'\]; pass encoder="):
        SphinxVisionEncoderConfig.from_pretrained(folder)
    config.convnext_config.save_pretrained(tmp_path / "convnext")
    assert SphinxVisionEncoderConfig.from_pretrained(tmp_path / "convnext").architecture == "convnext_xxlarge"
    with pytest.raises(ValueError, match="picks an encoder of a SPHINX model folder"):
        SphinxVisionEncoderConfig.from_pretrained(tmp_path / "convnext", encoder="clip")
