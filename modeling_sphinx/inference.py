"""One inference path for every tool: load a model, ask it about images, read the answer, draw it.

`sphinx-mllm chat`, `eval`, `serve`, `train` (loading), the lmms-eval plugin and the demo all go through here:

- `load_processor`, `load_model`, `load_pretrained`: from a folder or a Hub id, with a dtype, a device map or the
  LLM in 4-bit NF4; a name that is neither a model folder nor a loadable Hub model is explained in one line, and a
  local path that does not exist is reported so before any request to the Hub (`local_model_folder`);
- `user_turn`, `chat_inputs`, `generate_answers`: SPHINX's chat template over a batch of conversations
  (left-padded), generation, and the decoded new text of every row;
- `Chat`: a conversation about one image that keeps its KV cache between turns, so a later turn computes only
  its own tokens instead of every view and every earlier turn again; `Chat.stream` yields the answer as it grows;
- `read_answer`: an answer's boxes and points in pixels of the image; `draw_answer`: the image with them drawn.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from threading import Thread

import PIL.Image
import torch
from huggingface_hub.errors import HFValidationError
from PIL import ImageDraw
from safetensors import SafetensorError
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer

from .folder.dtypes import STORAGE_DTYPES, dtype_named
from .processing.tasks_sphinx import GroundedText, strip_separator

# QLoRA and `--load-in-4bit` quantize the LLM alone: bitsandbytes would otherwise turn every `nn.Linear` of the
# towers into 4-bit too, and this list replaces its default skips, so the output head is named as well
QUANTIZATION_SKIP = [
    "model.clip",
    "model.convnext",
    "model.dinov2",
    "model.qformer",
    "model.qformer_proj",
    "model.visual_proj",
    "lm_head",
]
ANSWER_COLOUR = (255, 64, 0)
POINT_COLOUR = (0, 200, 255)
TRUTH_COLOUR = (40, 200, 70)


MODEL_FOLDER_SOURCES = "sphinx-mllm init, convert, mix, train or the demo write model folders"


def local_model_folder(name: str) -> Path | None:
    """The local model folder `name` names, or None when it is a Hub id. A name that exists must be a folder with a
    `config.json`; one that looks like a path (absolute, starting with `.` or `~`, without exactly one `/`, under a
    folder that exists here, or no valid repo id) and does not exist is reported as missing, with no request to the
    Hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{name!r} is a folder but not a model folder: it has no config.json ({MODEL_FOLDER_SOURCES})"
            )
        return path
    if path.exists():
        raise ValueError(f"{name!r} is a file; a model is a folder or a Hub id")
    first = Path(name).parts[0] if Path(name).parts else ""
    looks_local = (
        name.startswith((".", "~", "/", "\\"))
        or name.count("/") != 1
        or Path(first).is_dir()
        or not _valid_repo_id(name)
    )
    if looks_local:
        raise ValueError(f"model folder {name!r} does not exist ({MODEL_FOLDER_SOURCES})")
    return None


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_device_map(device_map) -> None:
    """A `ValueError` when `device_map` names an accelerator this machine does not have."""
    if not isinstance(device_map, str) or device_map in ("auto", "balanced", "balanced_low_0", "sequential", "cpu"):
        return
    kind = "cuda" if device_map.isdigit() else device_map.split(":")[0]
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": torch.backends.mps}.get(kind)
    if backend is None:
        raise ValueError(f"device map {device_map!r} is not a device: use auto, cpu, cuda or cuda:N")
    if not backend.is_available():
        raise ValueError(
            f"device map {device_map!r}: this machine has no {kind} device; leave it out to run on the CPU"
        )


@contextmanager
def _explained_load_errors(name: str):
    local = local_model_folder(name)
    try:
        yield
    except (OSError, HFValidationError, SafetensorError) as error:
        reason = str(error).strip().splitlines()[0]
        if local is None:
            raise ValueError(f"{name!r} is neither a local folder nor a Hub model that loads: {reason}") from None
        raise ValueError(f"{name!r} is not a complete model folder: {reason}") from None


def load_processor(name: str, trust_remote_code: bool = False, revision: str | None = None):
    with _explained_load_errors(name):
        return AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)


def four_bit_config(
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_type: str = "nf4",
    double_quant: bool = True,
    storage_dtype: torch.dtype | None = None,
):
    """`BitsAndBytesConfig` for the LLM alone (NF4 with double quantisation unless told), computing and storing
    (for FSDP) in `compute_dtype`; the towers, projectors and `lm_head` stay in 16-bit. QLoRA training and
    `chat --load-in-4bit` share it."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_storage=storage_dtype or compute_dtype,
        llm_int8_skip_modules=QUANTIZATION_SKIP,
    )


def load_model(
    name: str,
    dtype: str | torch.dtype = "auto",
    device_map=None,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    use_kernels: bool = False,
    quantization_config=None,
    **from_pretrained,
):
    """The model in eval mode. `dtype`: "auto" (the folder's), a name of `STORAGE_DTYPES` or a torch dtype;
    `load_in_4bit`: the LLM in NF4 with `dtype` as compute dtype (float32 for "auto"), towers in 16-bit, or in
    `quantization_config` when given; `use_kernels`: let transformers swap layers for Hub kernels, downloaded at
    first use (`hub_kernels`); other keywords (`revision`, `attn_implementation`) go to `from_pretrained`."""
    if isinstance(dtype, str) and dtype != "auto":
        dtype = dtype_named(dtype, STORAGE_DTYPES)
    kwargs = {
        "dtype": dtype,
        "device_map": device_map,
        "trust_remote_code": trust_remote_code,
        "use_kernels": use_kernels,
        **from_pretrained,
    }
    if load_in_4bit:
        compute = torch.float32 if dtype == "auto" else dtype
        kwargs.update(dtype=compute, quantization_config=quantization_config or four_bit_config(compute))
    with _explained_load_errors(name):
        return AutoModelForImageTextToText.from_pretrained(name, **kwargs).eval()


def load_pretrained(name: str, **model_kwargs) -> tuple:
    """`(processor, model)`; the processor first, since it is the cheap one to find missing."""
    processor = load_processor(name, trust_remote_code=model_kwargs.get("trust_remote_code", False))
    return processor, load_model(name, **model_kwargs)


def user_turn(text: str, image: PIL.Image.Image | None = None) -> dict:
    """A user message in the chat template's format, the image (if any) before the text."""
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return {"role": "user", "content": content}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def chat_inputs(model, processor, conversations: list[list[dict]]):
    """The model inputs of a batch of conversations, each ending with a user turn, on the model's device."""
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def generate_answers(model, processor, conversations: list[list[dict]], **generation) -> list[str]:
    """The answer to the last user turn of each conversation (batched; greedy unless `do_sample=True`)."""
    inputs = chat_inputs(model, processor, conversations)
    with torch.inference_mode():
        generated = model.generate(**inputs, **generation)
    return processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])


def sampling_settings(sampling: bool, temperature: float = 0.7, top_p: float = 0.9) -> dict:
    """`generate` keywords for sampled or greedy decoding (greedy names no sampling knob, so none warns)."""
    if sampling:
        return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


class Chat:
    """A conversation about one image that keeps the model's KV cache between turns.

    Each turn renders the whole conversation with the template, keeps the cached positions that the new prompt
    shares with what the cache holds (the image, the earlier turns) and computes only the rest, so the visual
    tokens are encoded once per conversation. The answers are those of a fresh `generate` over the whole prompt.
    """

    def __init__(self, model, processor, image: PIL.Image.Image | None = None, reuse_cache: bool = True):
        self.model, self.processor, self.image = model, processor, image
        self.reuse_cache = reuse_cache
        self.messages: list[dict] = []
        self._cache = None
        self._cached_ids = None  # the token ids whose keys and values the cache holds, in order

    def _prepare(self, text: str) -> dict:
        self.messages.append(user_turn(text, self.image if not self.messages else None))
        inputs = dict(chat_inputs(self.model, self.processor, [self.messages]))
        if self._cache is not None:
            ids = inputs["input_ids"][0]
            cached = self._cached_ids[: min(len(self._cached_ids), len(ids) - 1)]
            shared = int((ids[: len(cached)] == cached).cumprod(0).sum())
            if shared > self.model.config.num_image_tokens:  # the image stays cached: no pixels needed
                surplus = self._cache.get_seq_length() - shared
                if surplus:
                    self._cache.crop(-surplus)  # transformers 5: a negative count drops that many positions
                inputs["cache"] = self._cache
                inputs.pop("pixel_values", None)
        return inputs

    def _finish(self, output, text: str) -> str:
        if self.reuse_cache:
            self._cache = output.cache
            # the last generated token was sampled, never fed: the cache ends one position before the sequence
            self._cached_ids = output.sequences[0, : output.cache.get_seq_length()]
        self.messages.append(assistant_turn(text))
        return text

    def _generate_kwargs(self, inputs: dict, generation: dict) -> dict:
        return {**inputs, **generation, "return_dict_in_generate": True, "use_cache": True}

    def ask(self, text: str, **generation) -> str:
        """The answer to `text` (the first turn shows the image), added to the conversation."""
        inputs = self._prepare(text)
        with torch.inference_mode():
            output = self.model.generate(**self._generate_kwargs(inputs, generation))
        new = output.sequences[0, inputs["input_ids"].shape[1] :]
        return self._finish(output, self.processor.post_process_image_text_to_text(new))

    def stream(self, text: str, **generation) -> Iterator[str]:
        """`ask`, yielding the answer as it grows (without the turn separator); the last value is the answer."""
        inputs = self._prepare(text)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result, failure = [], []

        def run():
            try:
                with torch.inference_mode():
                    result.append(self.model.generate(**self._generate_kwargs(inputs, generation), streamer=streamer))
            except Exception as error:  # re-raised in the caller's thread
                failure.append(error)
                streamer.on_finalized_text("", stream_end=True)

        worker = Thread(target=run, daemon=True)
        worker.start()
        text_so_far = ""
        for piece in streamer:
            text_so_far += piece
            yield strip_separator(text_so_far)
        worker.join()
        if failure:
            self.messages.pop()
            raise failure[0]
        new = result[0].sequences[0, inputs["input_ids"].shape[1] :]
        yield self._finish(result[0], self.processor.post_process_image_text_to_text(new))


def read_answer(processor, text: str, image: PIL.Image.Image) -> GroundedText:
    """The phrases, boxes and points of an answer, in pixels of `image`."""
    return processor.post_process_generation(text, image)


def draw_answer(image: PIL.Image.Image, grounded: GroundedText, truth: list[float] | None = None) -> PIL.Image.Image:
    """A copy of `image` with the answer's boxes (orange, with their phrases) and points (cyan), and a known
    true box (green) when given."""
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    if truth is not None:
        draw.rectangle(truth, outline=TRUTH_COLOUR, width=1)
    radius = max(2, min(image.size) // 120)
    for entity in grounded.entities:
        for box in entity.boxes:
            draw.rectangle(box, outline=ANSWER_COLOUR, width=max(1, min(image.size) // 150))
            if entity.phrase:
                draw.text((box[0] + 2, box[1] + 2), entity.phrase, fill=ANSWER_COLOUR)
        for x, y in entity.points:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=POINT_COLOUR)
    return image
