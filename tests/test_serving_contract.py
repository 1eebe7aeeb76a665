"""The calls a serving engine's Transformers backend makes (vLLM 0.32-0.33), made here with transformers alone.

vLLM encodes the images itself (`get_image_features(...).pooler_output`, `num_image_tokens` rows an image),
merges them into `inputs_embeds`, packs every scheduled sequence into one row with per-sequence `position_ids`,
and calls the base model without pixels, without a cache and with `return_dict=False`, attention going
through a function it registers (its paged kernel, which keeps the sequences apart).
"""

import base64
import http.server
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AttentionInterface,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    LogitsProcessor,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from modeling_sphinx.inference import chat_inputs, generate_answers, load_pretrained, user_turn
from modeling_sphinx.processing.tasks_sphinx import TASK_INSTRUCTIONS
from modeling_sphinx.serving.client import chat_request

from .helpers import IMAGES


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


class Script(LogitsProcessor):
    """Forces the next tokens to be `ids`, one a step: a model that says exactly what a test needs."""

    def __init__(self, ids: list[int], start: int):
        self.ids, self.start = ids, start

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0.0
        return forced


def test_served_answers_end_at_the_turn_marker_and_generate_at_the_whole_separator(tiny_model_dir):
    folder = tiny_model_dir("sphinx-tiny")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    saved = GenerationConfig.from_pretrained(folder)  # what vLLM and SGLang read: eos_token_id and nothing else
    tokenizer = processor.tokenizer
    marker = tokenizer.convert_tokens_to_ids("###")
    assert saved.eos_token_id == [tokenizer.eos_token_id, marker]
    # "a###b": the marker piece inside an answer, not after a newline (where the original would stop too)
    answer = [
        *tokenizer.encode("a", add_special_tokens=False),
        marker,
        *tokenizer.encode("b", add_special_tokens=False),
    ]
    separator = processor.separator_token_ids()[-1]
    script = answer + separator + tokenizer.encode("after", add_special_tokens=False)
    inputs = _prompt_with_image(processor, "What is it?")
    start = inputs["input_ids"].shape[1]

    def run(**kwargs):
        with torch.no_grad():
            out = model.generate(**inputs, logits_processor=[Script(script, start)], max_new_tokens=20, **kwargs)
        return out[0, start:].tolist()

    assert run() == answer + separator  # the bare "###" inside the answer does not end it; the separator does
    # an engine that knows only the saved eos ids stops at the first marker
    engine = run(separator_token_ids=[], eos_token_id=saved.eos_token_id)
    assert engine == answer[: answer.index(marker) + 1]


class FakeEngine(http.server.BaseHTTPRequestHandler):
    """`/v1/chat/completions` as a serving engine's Transformers backend answers it: the saved `eos_token_id`s and
    the request's stop strings, temperature and logit bias are all it knows of how SPHINX stops."""

    model = processor = None
    requests: list[dict] = []

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(request)
        parts = request["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        text = next(p["text"] for p in parts if p["type"] == "text")
        assert request["temperature"] == 0.0  # greedy
        banned = [int(token) for token, bias in request.get("logit_bias", {}).items() if bias <= -100]
        inputs = chat_inputs(self.model, self.processor, [[user_turn(text, image)]])
        saved = GenerationConfig.from_pretrained(self.model.name_or_path)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=request["max_tokens"], do_sample=False,
                                      eos_token_id=saved.eos_token_id, separator_token_ids=[],
                                      suppress_tokens=banned or None)[0, inputs["input_ids"].shape[1] :]  # fmt: skip
        answer = self.processor.decode(ids, skip_special_tokens=True)
        for stop in request.get("stop") or []:
            answer = answer.split(stop)[0]  # engines leave the stop string out of the answer
        body = json.dumps({"id": "1", "object": "chat.completion", "created": 0, "model": request["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": answer}}]}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        """Quiet: the test reads the replies, not a line per request on stderr."""


@pytest.mark.slow
def test_the_openai_client_request_reproduces_generates_answer_and_boxes(quick_demo):
    from openai import OpenAI

    folder = quick_demo[0] / "best"
    processor, model = load_pretrained(str(folder), dtype="float32")
    FakeEngine.model, FakeEngine.processor = model, processor
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="unused")
        split = next((quick_demo[0] / "data").glob("real-1*"))
        row = json.loads((split / "grounding.jsonl").read_text().splitlines()[0])
        image = Image.open(split / row["image"]).convert("RGB")
        question = TASK_INSTRUCTIONS["referring_expression"].format(expression=row["expression"])
        request = chat_request(str(folder), image, question, processor, max_tokens=32)
        served = client.chat.completions.create(**request).choices[0].message.content
    finally:
        server.shutdown()
    assert FakeEngine.requests[-1]["stop"] == ["\n###"]
    assert FakeEngine.requests[-1]["logit_bias"] == {str(processor.image_token_id): -100}
    expected = generate_answers(model, processor, [[user_turn(question, image)]], max_new_tokens=32, do_sample=False)
    assert served.strip() == expected[0].strip() and "[" in served
    assert (
        processor.post_process_generation(served, image).boxes
        == processor.post_process_generation(expected[0], image).boxes
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the benchmark runs for real")
def test_the_serving_benchmark_says_why_it_cannot_run_here(tiny_model_dir):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serving.py"
    run = subprocess.run([sys.executable, str(script), str(tiny_model_dir("sphinx-tiny"))], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert (
        run.returncode == 0
        and run.stdout.strip() == "bench_serving: skipped: no CUDA GPU (vLLM's Transformers backend serves on GPUs)"
    )
