import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration, SphinxModel, SphinxProcessor

from .helpers import IMAGES


def _inputs(processor, texts_and_images):
    texts = [t for t, _ in texts_and_images]
    images = [i for _, i in texts_and_images]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def test_auto_classes_resolve_to_sphinx(tiny_model_dir):
    folder = tiny_model_dir("sphinx-1k")
    assert isinstance(AutoConfig.from_pretrained(folder), SphinxConfig)
    assert isinstance(AutoProcessor.from_pretrained(folder), SphinxProcessor)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert isinstance(model, SphinxForConditionalGeneration)
    base, loading = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert isinstance(base, SphinxModel)
    # serving engines load the base model first: the folder's LM head is expected there, not reported
    assert not any(loading[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.can_generate()


def test_save_load_round_trip_gives_identical_logits(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("sphinx")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = _inputs(processor, [("<image>What is it?", Image.open(IMAGES / "chelsea.png"))])
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path / "again")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        after = reloaded(**inputs).logits
    assert torch.equal(before, after)


def test_frozen_encoders_get_no_gradients(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("sphinx"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(
        name.startswith(("model.clip.", "model.dinov2.", "model.convnext.", "model.qformer.")) for name in trainable
    )
    assert {"model.start_img", "model.visual_proj.0.weight", "lm_head.weight"} <= trainable
    model.train()
    assert not model.model.clip.training and model.model.language_model.training


@pytest.mark.parametrize("variant", ["sphinx-1k", "sphinx-tiny-1k"])
def test_batched_generation_equals_one_by_one(tiny_model_dir, variant):
    folder = tiny_model_dir(variant)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    samples = [
        ("<image>What is shown in this image? Please answer in detail.", Image.open(IMAGES / "rocket.jpg")),
        ("<image>Describe it.", Image.open(IMAGES / "text.png")),
        (
            "<image>Count the objects, carefully and one by one, in this very wide picture.",
            Image.open(IMAGES / "coffee.png"),
        ),
    ]
    batch = _inputs(processor, samples)
    assert processor.tokenizer.padding_side == "left"
    assert (batch["attention_mask"][:, 0] == 0).any(), "prompts of different lengths must be padded"
    batched = model.generate(**batch, max_new_tokens=6, separator_token_ids=[])
    new_batched = batched[:, batch["input_ids"].shape[1] :]
    for row, sample in enumerate(samples):
        single = _inputs(processor, [sample])
        alone = model.generate(**single, max_new_tokens=6, separator_token_ids=[])
        assert alone[0, single["input_ids"].shape[1] :].tolist() == new_batched[row].tolist()


def test_public_encoder_steps_rebuild_the_fused_features(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("sphinx")).eval().model
    pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    views, convnext_views = model.cut_views(pixels)
    with torch.no_grad():
        fused = torch.cat(
            [
                model.clip.forward_features(views),
                model.convnext_tokens(views, convnext_views),
                model.dinov2.forward_features(model.to_dinov2_statistics(views)),
            ],
            dim=-1,
        )
        expected = model.get_image_features(pixels).last_hidden_state
    assert torch.equal(fused, expected)


def test_pixels_are_encoded_once_per_generate(tiny_model_dir):
    folder = tiny_model_dir("sphinx")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    calls = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("pixel_values") is not None), with_kwargs=True
    )
    inputs = _inputs(processor, [("<image>Hi", Image.open(IMAGES / "chelsea.png"))])
    model.generate(**inputs, max_new_tokens=4, separator_token_ids=[])
    assert calls == [True, False, False, False]


def _greedy(model, **inputs):
    return model.generate(**inputs, do_sample=False, separator_token_ids=[])


def _pixels_encoded(model) -> list[bool]:
    """Whether each later forward of `model.model` is given pixels."""
    calls = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("pixel_values") is not None), with_kwargs=True
    )
    return calls


@pytest.mark.parametrize("pass_pixels", [False, True], ids=["without-pixels", "with-pixels"])
def test_generation_continues_from_its_cache(pass_pixels):
    torch.manual_seed(0)
    config = SphinxConfig.from_variant("sphinx", tiny=True)
    model = SphinxForConditionalGeneration(config).eval()
    n = config.num_image_tokens
    ids = torch.full((1, n + 5), 5)
    ids[:, :n] = config.image_token_id
    pixels = torch.randn(1, 3, 224, 224)
    uninterrupted = _greedy(model, input_ids=ids, pixel_values=pixels, max_new_tokens=4)
    out = _greedy(model, input_ids=ids, pixel_values=pixels, max_new_tokens=3, return_dict_in_generate=True)
    encoded = _pixels_encoded(model)
    again = {"pixel_values": pixels} if pass_pixels else {}
    continued = _greedy(model, input_ids=out.sequences, cache=out.cache, max_new_tokens=1, **again)
    assert continued.tolist() == uninterrupted.tolist()
    assert encoded == [False], "the image in the cache is not encoded again"


def test_second_turn_continues_from_the_cache(tiny_model_dir):
    folder = tiny_model_dir("sphinx")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = _inputs(processor, [("<image>What is it?", Image.open(IMAGES / "chelsea.png"))])
    out = _greedy(model, **inputs, max_new_tokens=4, return_dict_in_generate=True)
    second_turn = processor.tokenizer(" And its colour?", add_special_tokens=False, return_tensors="pt")
    conversation = torch.cat([out.sequences, second_turn["input_ids"]], dim=1)
    continued = _greedy(model, input_ids=conversation, cache=out.cache, max_new_tokens=5)
    fresh = _greedy(model, input_ids=conversation, pixel_values=inputs["pixel_values"], max_new_tokens=5)
    assert continued.shape[1] == conversation.shape[1] + 5
    assert continued.tolist() == fresh.tolist()


def test_new_image_after_the_cache_takes_all_pixels_or_only_its_own(tiny_model_dir):
    folder = tiny_model_dir("sphinx")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    first = _inputs(processor, [("<image>What is it?", Image.open(IMAGES / "chelsea.png"))])
    later = _inputs(processor, [("<image>And this?", Image.open(IMAGES / "rocket.jpg"))])
    out = _greedy(model, **first, max_new_tokens=2, return_dict_in_generate=True)
    conversation = torch.cat([out.sequences, later["input_ids"]], dim=1)
    both = torch.cat([first["pixel_values"], later["pixel_values"]])
    fresh = _greedy(model, input_ids=conversation, pixel_values=both, max_new_tokens=3)
    for pixels in (both, later["pixel_values"]):
        cache = copy.deepcopy(out.cache)
        continued = _greedy(model, input_ids=conversation, cache=cache, pixel_values=pixels, max_new_tokens=3)
        assert continued.tolist() == fresh.tolist()
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        _greedy(model, input_ids=conversation, cache=copy.deepcopy(out.cache), max_new_tokens=1)
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        _greedy(model, input_ids=first["input_ids"], max_new_tokens=1)


def test_left_padded_batch_continues_from_its_cache(tiny_model_dir):
    folder = tiny_model_dir("sphinx")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    samples = [
        ("<image>Hi", Image.open(IMAGES / "chelsea.png")),
        ("<image>Describe this picture in a few words.", Image.open(IMAGES / "rocket.jpg")),
    ]
    batch = _inputs(processor, samples)
    assert (batch["attention_mask"][:, 0] == 0).any(), "prompts of different lengths must be padded"
    uninterrupted = _greedy(model, **batch, max_new_tokens=5)
    out = _greedy(model, **batch, max_new_tokens=3, return_dict_in_generate=True)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    for again in ({}, {"pixel_values": batch["pixel_values"]}):
        cache = copy.deepcopy(out.cache)
        continued = _greedy(
            model, input_ids=out.sequences, attention_mask=mask, cache=cache, max_new_tokens=2, **again
        )
        assert continued.tolist() == uninterrupted.tolist()


def test_generation_stops_at_separator_tokens(tiny_model_dir):
    folder = tiny_model_dir("sphinx")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert model.generation_config.separator_token_ids == processor.separator_token_ids()
    inputs = _inputs(processor, [("<image>Hi", Image.open(IMAGES / "chelsea.png"))])
    free = model.generate(**inputs, max_new_tokens=12, separator_token_ids=[])[0, inputs["input_ids"].shape[1] :]
    stop = free[2:4].tolist()  # pretend the separator is what this random model says at steps 2-3
    stopped = model.generate(**inputs, max_new_tokens=12, separator_token_ids=[stop])[
        0, inputs["input_ids"].shape[1] :
    ]
    first = next(i for i in range(len(free) - 1) if free[i : i + 2].tolist() == stop)
    assert stopped.tolist() == free[: first + 2].tolist()


def test_image_token_is_never_generated(tiny_model_dir):
    folder = tiny_model_dir("sphinx")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        model.lm_head.weight[processor.image_token_id] = 100.0  # make the placeholder the favourite
    inputs = _inputs(processor, [("<image>Hi", Image.open(IMAGES / "chelsea.png"))])
    out = model.generate(**inputs, max_new_tokens=3, separator_token_ids=[])[0, inputs["input_ids"].shape[1] :]
    assert processor.image_token_id not in out.tolist()


def test_mismatched_image_tokens_raise(tiny_model_dir):
    folder = tiny_model_dir("sphinx")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    config = model.config
    ids = torch.tensor([[1] + [config.image_token_id] * (config.num_image_tokens - 1) + [5]])
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, config.image_size, config.image_size))
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="pixel_values are 100x100 px but this model expects 224"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 100, 100))


def test_context_length_overflow_is_a_clear_error(tiny_model_dir):
    folder = tiny_model_dir("sphinx-2k")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    long_prompt = "<image>" + " word" * 2000
    inputs = processor(text=long_prompt, images=Image.open(IMAGES / "chelsea.png"), return_tensors="pt")
    with pytest.raises(ValueError, match=r"2910 of them visual tokens\) but the model's context length is 4096"):
        model(**inputs)


@pytest.mark.slow
def test_remote_code_load_without_the_package(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("sphinx-tiny")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = _inputs(processor, [("<image>What is it?", Image.open(IMAGES / "astronaut.png"))])
    with torch.no_grad():
        expected = model(**inputs).logits[0, -3:].tolist()
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["modeling_sphinx"] = None  # make the package unimportable
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
        model = AutoModelForImageTextToText.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = processor(text="<image>What is it?", images=Image.open({str(IMAGES / "astronaut.png")!r}), return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -3:].tolist()
        pipe = pipeline("image-text-to-text", model={str(folder)!r}, trust_remote_code=True)
        out = pipe(text=[{{"role": "user", "content": [{{"type": "image", "path": {str(IMAGES / "astronaut.png")!r}}}, {{"type": "text", "text": "Hi"}}]}}], max_new_tokens=2)
        print(json.dumps({{"logits": logits, "answer": out[0]["generated_text"][-1]["content"]}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert torch.allclose(torch.tensor(payload["logits"]), torch.tensor(expected), atol=1e-5)
    assert isinstance(payload["answer"], str)


def test_training_step_with_gradient_checkpointing(tiny_model_dir):
    folder = tiny_model_dir("sphinx-tiny")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    model.activation_checkpointing_enable()
    model.train()
    inputs = _inputs(processor, [("<image>Describe it. A cat.", Image.open(IMAGES / "chelsea.png"))])
    labels = inputs["input_ids"].clone()
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.visual_proj[0].weight.grad is not None
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None
    assert all(p.grad is None for p in model.model.dinov2.parameters())
    # image positions never count as targets
    masked = labels.masked_fill(labels == model.config.image_token_id, -100)
    with torch.no_grad():
        assert torch.allclose(model(**inputs, labels=labels).loss, model(**inputs, labels=masked).loss)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_backends_agree(tiny_model_dir, attn_implementation):
    folder = tiny_model_dir("sphinx")
    processor = AutoProcessor.from_pretrained(folder)
    reference = AutoModelForImageTextToText.from_pretrained(folder).eval()
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=attn_implementation).eval()
    assert model.config.text_config._attn_implementation == attn_implementation
    inputs = _inputs(processor, [("<image>Hi there", Image.open(IMAGES / "chelsea.png"))])
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, reference(**inputs).logits, atol=1e-4)


def test_device_map_auto_and_bfloat16(tiny_model_dir):
    folder = tiny_model_dir("sphinx-moe")
    model = AutoModelForImageTextToText.from_pretrained(folder, device_map="auto", dtype=torch.bfloat16).eval()
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert {"Block", "ConvNeXtBlock", "Blip2QFormerLayer", "MixtralDecoderLayer"} <= set(model._no_split_modules)
    processor = AutoProcessor.from_pretrained(folder)
    inputs = _inputs(processor, [("<image>Hi", Image.open(IMAGES / "hubble_deep_field.jpg"))])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    out = model.generate(**inputs, max_new_tokens=2, separator_token_ids=[])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_context_bound_is_per_sequence_when_sequences_are_packed(tiny_model_dir):
    """A serving engine packs sequences into one row, each with its own positions: the row may be longer than
    the context, no sequence's positions may pass it."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("sphinx-tiny")).eval()
    context = model.config.text_config.max_position_embeddings
    embed = model.get_input_embeddings()
    lengths = (context - 8, 24)
    packed = embed(torch.randint(0, 200, (1, sum(lengths)), generator=torch.Generator().manual_seed(0)))
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    with torch.no_grad():
        hidden = model.model(inputs_embeds=packed, position_ids=positions, use_cache=False, return_dict=False)[0]
        assert packed.shape[1] > context and hidden.shape == packed.shape
        past_the_end = torch.arange(context - 23, context + 1)[None]
        with pytest.raises(ValueError, match=rf"needs {context + 1} positions .* context length is {context}"):
            model.model(inputs_embeds=packed[:, :24], position_ids=past_the_end)
        with pytest.raises(ValueError, match=rf"needs {sum(lengths)} positions .* context length is {context}"):
            model.model(inputs_embeds=packed)  # without positions the row is one sequence


def test_attention_implementation_switches_every_attention_model_quietly(tiny_model_dir, capfd):
    model = AutoModel.from_pretrained(tiny_model_dir("sphinx-1k"))
    towers = (model.language_model, model.qformer.vision_model, model.qformer.qformer)
    for name in ("eager", "sdpa"):
        capfd.readouterr()
        model.set_attn_implementation(name)
        assert "without finding the associated sub-model" not in capfd.readouterr().err
        assert {tower.config._attn_implementation for tower in towers} == {name}


def test_kept_frozen_features_train_alike_and_encode_each_image_once(tiny_model_dir):
    folder = tiny_model_dir("sphinx-1k")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).train()
    reference = copy.deepcopy(model)
    encoded = []
    model.model.clip.patch_embed.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    views = model.config.num_views
    cat, rocket = Image.open(IMAGES / "chelsea.png"), Image.open(IMAGES / "rocket.jpg")
    batch = _inputs(processor, [("<image>A cat.", cat), ("<image>A rocket.", rocket), ("<image>The cat.", cat)])
    labels = batch["input_ids"].clone()

    model.keep_frozen_features(2)
    expected = reference(**batch, labels=labels, output_hidden_states=True)
    expected.loss.backward()
    for _ in range(2):
        model.zero_grad()
        kept = model(**batch, labels=labels, output_hidden_states=True)
        kept.loss.backward()
        torch.testing.assert_close(kept.loss, expected.loss, rtol=1e-5, atol=0)
        for name in ("model.visual_proj.0.weight", "model.start_img", "lm_head.weight"):
            grads = (dict(m.named_parameters())[name].grad for m in (model, reference))
            torch.testing.assert_close(*grads, rtol=1e-4, atol=1e-7)
    assert encoded == [2 * views]  # the two distinct images, once

    encoded.clear()
    model.keep_frozen_features(1)  # the store empties, then holds the last image used: the cat is encoded again
    for _ in range(2):
        model(**_inputs(processor, [("<image>A cat.", cat), ("<image>A rocket.", rocket)]))
    assert encoded == [2 * views, views]

    with pytest.raises(ValueError, match="must be 0 or more"):
        model.keep_frozen_features(-1)
    trained = AutoModelForImageTextToText.from_pretrained(folder, freeze_vision_encoders=False)
    with pytest.raises(ValueError, match=r"encoders are trained \(freeze_vision_encoders: false\)"):
        trained.keep_frozen_features(8)
