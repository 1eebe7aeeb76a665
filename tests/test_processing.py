import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from modeling_sphinx import SphinxImageProcessor, SphinxImageProcessorPil
from modeling_sphinx.processing.image_processing_sphinx import pillow_resize
from modeling_sphinx.processing.tasks_sphinx import SYSTEM_PROMPT, format_box

from .helpers import IMAGES, image_message


def original_prompt(turns: list[tuple[str, str | None]]) -> str:
    """LLaMA2-Accessory conv_v1_2 rendering, written out from its definition."""
    text = SYSTEM_PROMPT + "\n\n" + "###"
    for question, answer in turns:
        text += " Human: " + question + "\n" + "###"
        text += " Assistant:" if answer is None else " Assistant: " + answer + "\n" + "###"
    return text


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir("sphinx-1k"))


def test_chat_template_is_byte_exact(processor):
    single = image_message("What is shown in this image?", path=IMAGES / "astronaut.png")
    rendered = processor.apply_chat_template(single, add_generation_prompt=True)
    assert rendered == "<s><image>" + original_prompt([("What is shown in this image?", None)])

    multi = single + [
        {"role": "assistant", "content": [{"type": "text", "text": "An astronaut."}]},
        {"role": "user", "content": [{"type": "text", "text": "Where is the flag?"}]},
    ]
    rendered = processor.apply_chat_template(multi, add_generation_prompt=True)
    expected = original_prompt([("What is shown in this image?", "An astronaut."), ("Where is the flag?", None)])
    assert rendered == "<s><image>" + expected

    text_only = [{"role": "user", "content": "Hello"}]
    assert (
        processor.apply_chat_template(text_only)
        == "<s>" + original_prompt([("Hello", "")])[: -len(" Assistant: \n###")]
    )


def test_custom_system_prompt_and_bad_role(processor):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(messages) == "<s>Be brief.\n\n### Human: Hi\n###"
    with pytest.raises(Exception, match="got role tool"):
        processor.apply_chat_template([{"role": "tool", "content": "x"}])


def test_assistant_mask_covers_answer_and_separator(processor):
    messages = image_message("What is it?", path=IMAGES / "chelsea.png") + [
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}
    ]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True
    )
    ids = out["input_ids"][0]
    mask = out["assistant_masks"][0].bool()
    supervised = processor.tokenizer.decode(ids[mask])
    assert supervised.strip() == "A cat.\n###"
    assert (ids == processor.image_token_id).sum() == processor.num_image_tokens
    assert ids[0] == processor.tokenizer.bos_token_id and ids[1] == processor.image_token_id


def test_assistant_mask_matches_transformers_rule(processor, monkeypatch):
    """The array version gives transformers' own masks: a padded batch, two turns, images and none."""
    from transformers.processing_utils import ProcessorMixin

    two_turns = image_message("What is it?", path=IMAGES / "chelsea.png") + [
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Orange, with [0.1,0.2,0.3,0.4]."}]},
    ]
    text_only = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, human."}]
    for batch in ([two_turns, two_turns[:2]], [text_only]):
        kwargs = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True}
        kwargs["processor_kwargs"] = {"padding": True}
        ours = processor.apply_chat_template(batch, **kwargs)["assistant_masks"]
        with monkeypatch.context() as patch:
            patch.setattr(
                type(processor), "_adjust_assistant_masks_indices", ProcessorMixin._adjust_assistant_masks_indices
            )
            theirs = processor.apply_chat_template(batch, **kwargs)["assistant_masks"]
        assert ours == theirs and any(any(mask) for mask in ours)


def test_image_placeholder_expansion_right_after_bos(processor):
    out = processor(text="<image>A chat", images=Image.open(IMAGES / "coffee.png"), return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    n = processor.num_image_tokens
    assert ids[0] == processor.tokenizer.bos_token_id
    assert ids[1 : 1 + n] == [processor.image_token_id] * n
    # the text after the placeholders is tokenised like the start of a prompt (SentencePiece dummy prefix)
    assert ids[1 + n :] == processor.tokenizer("A chat", add_special_tokens=False)["input_ids"]
    assert out["pixel_values"].shape == (1, 3, 448, 448)


def test_a_plain_question_with_an_image_is_asked_through_the_chat_template(processor):
    """`pipe(images=..., text="What is it?")` reaches the processor as a text without `<image>`: it becomes the
    user turn that the messages form would render, image first."""
    image = Image.open(IMAGES / "coffee.png")
    messages = image_message("What is it?", image)
    expected = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    plain = processor(text="What is it?", images=image)
    assert plain["input_ids"][0] == list(expected["input_ids"][0])
    batch = processor(text=["What is it?", "Is it hot?"], images=[image, image], padding=True)
    assert len(batch["input_ids"]) == 2 and batch["pixel_values"].shape[0] == 2


def test_an_image_url_that_cannot_be_fetched_is_one_error_naming_it(processor, monkeypatch):
    import transformers.image_utils

    def no_network(url, **kwargs):
        raise transformers.image_utils.httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(transformers.image_utils.httpx, "get", no_network)
    url = "https://example.com/cat.png"
    messages = [{"role": "user", "content": [{"type": "image", "url": url}, {"type": "text", "text": "What?"}]}]
    with pytest.raises(ValueError, match=rf"cannot fetch the image at {url} \(ConnectError: .*\); download it"):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)


def test_image_count_must_match_placeholders(processor):
    image = Image.open(IMAGES / "coffee.png")
    with pytest.raises(ValueError, match="Found total 2 <image> tokens and 1 images"):
        processor(text="<image><image>Hi", images=image)
    with pytest.raises(ValueError, match="2 texts without '<image>' .* or pass messages, e.g. text=\\[\\{'role'"):
        processor(text=["Hi", "Ho"], images=image)
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text="<image>Hi")
    with pytest.raises(ValueError, match="videos or audio"):
        processor(text="Hi", videos=[np.zeros((2, 8, 8, 3), np.uint8)])
    assert "pixel_values" not in processor(text="Hi", videos=None, audios=None)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("backend", [SphinxImageProcessor, SphinxImageProcessorPil])
def test_unusual_images_are_converted(backend, tmp_path):
    image_processor = backend(size={"height": 224, "width": 224})
    rgb = Image.open(IMAGES / "chelsea.png").convert("RGB")
    sixteen_bit = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    assert sixteen_bit.mode.startswith("I;16")
    cases = {
        "1x1": Image.new("RGB", (1, 1), (255, 0, 0)),
        "1x10000": Image.new("RGB", (1, 10000), (0, 255, 0)),
        "10000x1": Image.new("RGB", (10000, 1), (0, 255, 0)),
        "rgba": rgb.convert("RGBA"),
        "cmyk": rgb.convert("CMYK"),
        "greyscale": rgb.convert("L"),
        "palette": rgb.convert("P"),
        "16-bit": sixteen_bit,
        "numpy-hwc": np.asarray(rgb),
        "numpy-1xW": np.zeros((1, 50, 3), dtype=np.uint8),
    }
    for name, image in cases.items():
        pixels = image_processor(image, return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, 224, 224), name
        assert torch.isfinite(pixels).all(), name
    grey = image_processor(rgb.convert("L"), return_tensors="pt")["pixel_values"]
    deep = image_processor(sixteen_bit, return_tensors="pt")["pixel_values"]
    assert (grey - deep).abs().max() < 0.02  # 16-bit scaled to the same 8-bit levels


@pytest.mark.parametrize("backend", [SphinxImageProcessor, SphinxImageProcessorPil])
def test_corrupt_and_truncated_files_name_the_file(backend, tmp_path):
    image_processor = backend(size={"height": 224, "width": 224})
    png = _encode(Image.open(IMAGES / "chelsea.png"), "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png[: len(png) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all")
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match=f"cannot decode image file '{path}'"):
            image_processor(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        image_processor(str(tmp_path / "missing.png"))
    lazily_opened = Image.open(truncated)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        image_processor(lazily_opened)


def test_pil_backend_matches_original_padding_and_resize(tmp_path):
    """Pad with (122,116,104) centred, Pillow bicubic: the original `padded_resize`, pixel for pixel."""
    image = Image.open(IMAGES / "text.png").convert("RGB")
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (122, 116, 104))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    expected = np.asarray(canvas.resize((448, 448), Image.BICUBIC), dtype=np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    expected = ((expected - mean) / std).transpose(2, 0, 1)
    pixels = SphinxImageProcessorPil(size={"height": 448, "width": 448})(image, return_tensors="pt")["pixel_values"]
    assert np.abs(pixels[0].numpy() - expected).max() < 1e-5
    default = SphinxImageProcessor(size={"height": 448, "width": 448})(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(default, pixels)  # the default (torchvision) backend is exact too


def test_grounding_parse_to_pixels(processor):
    height, width = 300, 600  # landscape: padded square of side 600, 150 rows above
    answer = "There is <p>a cat</p>[0.10,0.25,0.50,0.75;0.6,0.3,0.9,0.7] and a point [0.5,0.5].\n###"
    grounded = processor.post_process_generation(answer, image_sizes=(height, width))
    assert grounded.text == "There is a cat[0.10,0.25,0.50,0.75;0.6,0.3,0.9,0.7] and a point [0.5,0.5]."
    cat, point = grounded.entities
    assert cat.phrase == "a cat"
    assert cat.boxes == [pytest.approx([60.0, 0.0, 300.0, 300.0]), pytest.approx([360.0, 30.0, 540.0, 270.0])]
    assert point.phrase is None and point.points == [pytest.approx([300.0, 150.0])]
    assert format_box([60.0, 0.0, 300.0, 300.0], (height, width)) == "[0.10,0.25,0.50,0.75]"
    many = processor.post_process_generation(["[0.1,0.1,0.2,0.2]", "nothing"], image_sizes=[(10, 10), (20, 20)])
    assert many[0].boxes == [pytest.approx([1.0, 1.0, 2.0, 2.0])] and many[1].entities == []


def test_boxes_come_in_pixels_of_the_image_itself_and_a_bare_size_is_refused(processor):
    """PIL's `image.size` is (width, height): a bare pair in place of the image could be either order, so it is
    refused; the image itself (PIL, array or tensor) or `image_sizes=` by keyword give the same pixels."""
    answer = "<p>a cat</p>[0.10,0.25,0.50,0.75]"
    image = Image.new("RGB", (600, 300))
    expected = processor.post_process_generation(answer, image_sizes=(300, 600)).boxes
    assert expected == [pytest.approx([60.0, 0.0, 300.0, 300.0])]
    assert processor.post_process_generation(answer, image).boxes == expected
    assert processor.post_process_generation(answer, np.asarray(image)).boxes == expected
    assert processor.post_process_generation(answer, torch.zeros(3, 300, 600)).boxes == expected
    assert [g.boxes for g in processor.post_process_generation([answer, answer], [image, image])] == [expected] * 2
    for bare in (image.size, (300, 600), [600, 300]):
        with pytest.raises(ValueError, match=r"image itself, or image_sizes=\(height, width\) by keyword"):
            processor.post_process_generation(answer, bare)
    with pytest.raises(ValueError, match="needs the image"):
        processor.post_process_generation(answer)
    with pytest.raises(ValueError, match="2 answers but 1 images"):
        processor.post_process_generation([answer, answer], [image])


def test_post_process_strips_separator(processor):
    ids = processor.tokenizer("An answer.\n###", add_special_tokens=False)["input_ids"]
    assert processor.post_process_image_text_to_text(ids) == "An answer."
    assert processor.post_process_image_text_to_text([ids, ids[:2]])[0] == "An answer."


@pytest.mark.parametrize("resample", ["BICUBIC", "BILINEAR", "LANCZOS", "BOX", "HAMMING"])
def test_pillow_resize_is_pillow_bit_for_bit(resample):
    filters = getattr(Image, "Resampling", Image)
    method = getattr(filters, resample)
    rng = np.random.default_rng(0)
    photo = np.asarray(Image.open(IMAGES / "rocket.jpg").convert("RGB"))
    cases = [(int(s), int(o)) for s, o in zip(rng.integers(1, 300, 12), rng.integers(1, 300, 12), strict=True)]
    cases += [(600, 448), (300, 448), (1000, 1024), (448, 224)]
    for side, out in cases:
        square = np.ascontiguousarray(photo[:side, :side])
        side = min(square.shape[:2])
        square = np.ascontiguousarray(square[:side, :side])
        expected = np.asarray(Image.fromarray(square).resize((out, out), method))
        got = pillow_resize(torch.from_numpy(square).permute(2, 0, 1), (out, out), method)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected), (side, out)
    # one axis at a time, upscaling both axes, and Pillow's float mode
    for (height, width), (out_height, out_width) in [
        ((37, 120), (37, 45)),
        ((90, 41), (13, 41)),
        ((20, 30), (51, 77)),
    ]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(image).resize((out_width, out_height), method))
        got = pillow_resize(torch.from_numpy(image).permute(2, 0, 1), (out_height, out_width), method)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)
    values = rng.random((33, 47)).astype(np.float32)
    expected = np.asarray(Image.fromarray(values, mode="F").resize((20, 70), method))
    assert np.array_equal(pillow_resize(torch.from_numpy(values), (70, 20), method).numpy(), expected)


def test_pillow_resize_rejects_filters_it_does_not_have():
    with pytest.raises(ValueError, match="resample must be one of Pillow's convolution filters"):
        pillow_resize(torch.zeros(3, 8, 8, dtype=torch.uint8), (4, 4), Image.Resampling.NEAREST)


def test_resize_images_is_where_a_subclass_chooses_the_resize():
    resized_to = []

    class TorchPortEverywhere(SphinxImageProcessor):
        def resize_images(self, images, size, resample):
            resized_to.append(size)
            return pillow_resize(images, size, resample)

    size = {"height": 224, "width": 224}
    images = [Image.open(IMAGES / "chelsea.png"), Image.open(IMAGES / "rocket.jpg")]
    expected = SphinxImageProcessor(size=size)(images, return_tensors="pt")["pixel_values"]
    got = TorchPortEverywhere(size=size)(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(got, expected)
    assert resized_to and set(resized_to) == {(224, 224)}


def test_truncated_files_are_refused_even_when_another_library_allows_them(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what lmms-eval sets on import
    png = _encode(Image.open(IMAGES / "chelsea.png"), "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png[: len(png) // 2])
    for backend in (SphinxImageProcessor, SphinxImageProcessorPil):
        with pytest.raises(ValueError, match="cannot decode image file"):
            backend(size={"height": 224, "width": 224})(str(truncated))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global setting is left as it was
