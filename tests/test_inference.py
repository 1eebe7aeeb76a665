"""The shared inference path (`modeling_sphinx.inference`): loading, batched answers, cached chats, drawing."""

import json
import os
import re

import pytest
import torch
from PIL import Image

from modeling_sphinx.inference import (
    ANSWER_COLOUR,
    TRUTH_COLOUR,
    Chat,
    draw_answer,
    generate_answers,
    load_model,
    load_pretrained,
    load_processor,
    read_answer,
    user_turn,
)

from .helpers import IMAGES

QUESTIONS = ["What is it?", "What colour is it?", "Where is the cat?"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_pretrained(str(tiny_model_dir("sphinx-1k")))


def _count_image_encodings(model) -> list[int]:
    calls = [0]
    original = model.model.get_image_features

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    model.model.get_image_features = counting
    return calls


def test_a_chat_encodes_its_image_once_and_answers_as_a_fresh_generate(loaded):
    processor, model = loaded
    image = Image.open(IMAGES / "chelsea.png")
    answers = {}
    for reuse in (True, False):
        calls = _count_image_encodings(model)
        try:
            chat = Chat(model, processor, image, reuse_cache=reuse)
            answers[reuse] = [chat.ask(question, max_new_tokens=6) for question in QUESTIONS]
        finally:
            del model.model.get_image_features
        assert calls[0] == (1 if reuse else len(QUESTIONS)), reuse
    assert answers[True] == answers[False]
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * len(QUESTIONS)
    fresh = generate_answers(model, processor, [chat.messages[:-1]], max_new_tokens=6)
    assert fresh == [answers[True][-1]]


def test_stream_grows_to_the_answer_that_ask_gives(loaded):
    processor, model = loaded
    image = Image.open(IMAGES / "coffee.png")
    asked = Chat(model, processor, image)
    streamed = Chat(model, processor, image)
    for question in QUESTIONS[:2]:
        expected = asked.ask(question, max_new_tokens=8)
        pieces = list(streamed.stream(question, max_new_tokens=8))
        assert pieces[-1] == expected and len(pieces) >= 2
        assert all(
            later.startswith(earlier.rstrip()) for earlier, later in zip(pieces[:-2], pieces[1:-1], strict=True)
        )
    assert streamed.messages == asked.messages


def test_a_batch_answers_as_each_conversation_alone(loaded):
    processor, model = loaded
    conversations = [
        [user_turn("What is it?", Image.open(IMAGES / "chelsea.png"))],
        [user_turn("Describe this page in detail, please.", Image.open(IMAGES / "page.png"))],
    ]
    batched = generate_answers(model, processor, conversations, max_new_tokens=4, do_sample=False)
    alone = [generate_answers(model, processor, [c], max_new_tokens=4, do_sample=False)[0] for c in conversations]
    assert batched == alone


def test_loading_explains_what_is_missing(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="model folder '.*nowhere' does not exist") as missing:
        load_pretrained(str(tmp_path / "nowhere"))
    assert "\n" not in str(missing.value)
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny_model_dir("sphinx") / "config.json").read_text())
    with pytest.raises(ValueError, match="is not a complete model folder"):
        load_pretrained(str(config_only))
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        load_pretrained(str(tiny_model_dir("sphinx")), dtype="int8")


@pytest.mark.parametrize("name", ["/abs/missing", "./missing", "runs/demo/best", "~/missing-model", "missing"])
def test_a_name_that_looks_like_a_path_is_a_missing_folder_before_any_request(name, monkeypatch):
    """A path that does not exist is reported as a missing folder at once: the Hub is never asked (its client
    would retry for minutes on a machine without network)."""
    import huggingface_hub

    def no_request(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_request)
    with pytest.raises(ValueError, match=rf"model folder {re.escape(repr(name))} does not exist"):
        load_pretrained(name)


def test_a_folder_or_file_that_is_not_a_model_says_so(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a folder but not a model folder: it has no config.json"):
        load_model(str(tmp_path / "folder"))
    with pytest.raises(ValueError, match="is a file; a model is a folder or a Hub id"):
        load_processor(str(tmp_path / "file"))


def test_a_runs_folder_name_is_local_once_its_first_folder_exists(tmp_path, monkeypatch):
    """`runs/tiny` is also a well-formed Hub id: it is a local path where `runs/` exists."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match="model folder 'runs/tiny' does not exist"):
        load_pretrained("runs/tiny")


def test_a_truncated_weights_file_is_an_incomplete_folder(tmp_path, tiny_model_dir):
    import shutil

    folder = shutil.copytree(tiny_model_dir("sphinx"), tmp_path / "model")
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ValueError, match="'.*model' is not a complete model folder: .*deserializing header"):
        load_model(str(folder))


def test_read_and_draw_an_answer(loaded):
    processor, _ = loaded
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    # the image pads to a 200 x 200 square with 50 rows above: y fractions map through that padding
    grounded = read_answer(processor, "<p>a cat</p>[0.10,0.30,0.50,0.60] at [0.75,0.50]", image)
    assert grounded.boxes == [pytest.approx([20, 10, 100, 70])] and grounded.points == [pytest.approx([150, 50])]
    drawn = draw_answer(image, grounded, truth=[120, 20, 180, 80])
    assert image.getpixel((20, 40)) == (255, 255, 255)  # the input is left as it was
    assert drawn.getpixel((20, 40)) == ANSWER_COLOUR and drawn.getpixel((120, 50)) == TRUTH_COLOUR
    assert drawn.getpixel((150, 50)) != (255, 255, 255)  # the point
    assert json.dumps(grounded.boxes)  # plain numbers, ready for an API answer


def test_generation_from_a_kept_cache_matches_one_generate(loaded):
    """What `Chat` relies on: `generate` continued from the cache of a prompt with an image."""
    processor, model = loaded
    inputs = processor.apply_chat_template(
        [[user_turn("What is it?", Image.open(IMAGES / "chelsea.png"))]],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    settings = {"do_sample": False, "separator_token_ids": []}
    whole = model.generate(**inputs, max_new_tokens=6, **settings)
    first = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, **settings)
    rest = model.generate(input_ids=first.sequences, cache=first.cache, max_new_tokens=3, **settings)
    assert torch.equal(rest, whole)
