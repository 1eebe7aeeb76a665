"""The decode step and the prefill compile whole; static-cache and compiled generation give the default's tokens.

transformers' own generation tests that `_can_compile_fullgraph` turns on (`test_generate_with_static_cache`,
`test_generate_compile_model_forward_fullgraph`), fitted to SPHINX: images in the prompt, left-padded batches.
Dynamo runs on the CPU, and its `eager` backend needs no C compiler, so graph breaks are counted here as they
would be on a GPU; `CompileConfig._compile_all_devices` is how transformers' tests make `generate` compile on
the CPU.
"""

import logging

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText, AutoProcessor, CompileConfig, DynamicCache, StaticCache

from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration
from modeling_sphinx.inference import chat_inputs

from .helpers import IMAGES, image_message

NEW_TOKENS = 6


def _batch(model, processor, questions=("What is it?", "Please provide the bounding box of the cat.")):
    """Two questions about one photo, left-padded into one batch."""
    image = Image.open(IMAGES / "chelsea.png")
    return chat_inputs(model, processor, [image_message(question, image) for question in questions])


def _greedy(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            **kwargs,
        )


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    folder = tiny_model_dir("sphinx-1k")
    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("variant", ["sphinx-1k", "sphinx-tiny", "sphinx-moe"])
def test_decode_step_and_prefill_compile_with_no_graph_break(variant):
    """The step generation repeats (a cache, one new id, no pixels) and the prefill with an image each trace into one
    graph: nothing reads a value back from the device (LLaMA, the light variant and Mixtral)."""
    assert SphinxForConditionalGeneration._can_compile_fullgraph
    torch.manual_seed(0)
    config = SphinxConfig.from_variant(variant, tiny=True)
    model = SphinxForConditionalGeneration(config).eval()
    ids = torch.tensor([[1] + [config.image_token_id] * config.num_image_tokens + [5, 6, 7]])
    length = ids.shape[1]
    cache = StaticCache(config=config, max_cache_len=length + 4)
    prefill = {
        "input_ids": ids,
        "pixel_values": torch.randn(1, 3, config.image_size, config.image_size),
        "position_ids": torch.arange(length)[None],
    }
    step = {
        "input_ids": torch.tensor([[9]]),
        "attention_mask": torch.ones(1, length + 1, dtype=torch.long),
        "position_ids": torch.tensor([[length]]),
    }
    torch.compiler.reset()
    with torch.no_grad():
        for name, inputs in (("prefill", prefill), ("decode step", step)):
            explained = torch._dynamo.explain(model)(**inputs, cache=cache, use_cache=True)
            reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), (name, reasons)


def test_static_cache_generation_equals_the_default(model_and_processor):
    model, processor = model_and_processor
    inputs = _batch(model, processor)
    default = _greedy(model, inputs)
    static = _greedy(model, inputs, cache_implementation="static")
    assert isinstance(default.cache, DynamicCache) and isinstance(static.cache, StaticCache)
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    batch, length = inputs["input_ids"].shape
    # the last generated token is never fed back, so it has no place in the cache
    assert static.cache.layers[0].keys.shape == (batch, text.num_key_value_heads, length + NEW_TOKENS - 1, head_dim)
    assert len(static.cache) == text.num_hidden_layers
    assert torch.equal(static.sequences, default.sequences)


def test_compiled_generation_equals_eager_and_does_not_recompile(model_and_processor, caplog):
    """transformers' `test_generate_compile_model_forward_fullgraph`: eager first, then the decode step compiled
    with `fullgraph=True` for two batches of the same shape, the second without recompiling."""
    model, processor = model_and_processor
    questions = ("What is it?", "Please provide the bounding box of the cat.")
    batches = [
        _batch(model, processor, questions),
        _batch(model, processor, questions[::-1]),
    ]  # same shape, other rows
    compile_config = CompileConfig(backend="eager", fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    torch.compiler.reset()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    with torch.compiler.set_stance("force_eager"):
        eager = [_greedy(model, inputs) for inputs in batches]
    assert not hasattr(model, "_compiled_call")
    compiled = [_greedy(model, batches[0], cache_implementation="static", compile_config=compile_config)]
    assert hasattr(model, "_compiled_call") and compiled[0].cache.is_compileable
    torch._logging.set_logs(recompiles_verbose=True)
    try:
        with caplog.at_level(logging.DEBUG, logger="torch._dynamo"):
            compiled.append(_greedy(model, batches[1], cache_implementation="static", compile_config=compile_config))
    finally:
        torch._logging.set_logs()
        del model._compiled_call
    assert "Recompiling" not in caplog.text
    for reference, result in zip(eager, compiled, strict=True):
        assert torch.equal(result.sequences, reference.sequences)
    assert not torch.equal(compiled[0].sequences, compiled[1].sequences)


def test_generation_stops_at_the_context_and_a_prompt_past_it_is_refused_up_front(caplog):
    """`generate` checks the positions once per call (the compiled step cannot): `max_new_tokens` past the context
    is cut to the room left, with a warning, and a prompt longer than the context is refused before any work, with
    the count of its visual tokens."""
    torch.manual_seed(0)
    config = SphinxConfig.from_variant("sphinx", tiny=True, text_config={"max_position_embeddings": 320})
    model = SphinxForConditionalGeneration(config).eval()
    visual = config.num_image_tokens
    ids = torch.tensor([[1] + [config.image_token_id] * visual + [5] * 9])  # 301 positions
    pixels = torch.zeros(1, 3, config.image_size, config.image_size)
    room = 320 - ids.shape[1] + 1  # the last token is never fed back: the last position used is 319
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = model.generate(
            input_ids=ids,
            pixel_values=pixels,
            max_new_tokens=1_000_000,
            min_new_tokens=room,  # no end of sequence before the context
            do_sample=False,
            separator_token_ids=[],
        )
    assert out.shape[1] - ids.shape[1] == room
    assert "max_new_tokens=1000000 would run past the model's context of 320 positions" in caplog.text
    assert f"generating at most {room} new tokens" in caplog.text
    too_long = torch.tensor([[1] + [config.image_token_id] * visual + [5] * 40])
    with pytest.raises(ValueError, match=rf"prompt needs 332 positions \({visual} of them visual tokens\).*320"):
        model.generate(input_ids=too_long, pixel_values=pixels, max_new_tokens=4)


class HostRoundTrips(TorchDispatchMode):
    """Counts the operations that wait for the device: reading a value back, or copying a host value to it."""

    WAITING = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.lift_fresh", "aten.item")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self.WAITING:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def test_encoding_images_never_waits_for_the_device(tiny_model_dir):
    """`get_image_features` queues its whole work without a read back or a host copy, so the launches of its ~1,650
    kernels (at full size) overlap the device's work, and the encoders can be captured in CUDA graphs."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("sphinx-1k")).eval()
    pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        model.get_image_features(pixels)  # the first call makes the constants of each dtype and device
        with HostRoundTrips() as waits:
            model.get_image_features(pixels)
    assert waits.found == []
