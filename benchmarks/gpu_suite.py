"""Every GPU path of the package, measured in one run on one GPU, offline.

    python benchmarks/gpu_suite.py --out runs/gpu-suite                  # one GPU: about 8 minutes on an H200
    python benchmarks/gpu_suite.py --device cpu --tiny --out DIR         # the dry run the test suite runs

Writes `OUT/results.json` (every figure, each section's status and error) and `OUT/results.md` (the tables and
the targets of `docs/gpu.md`). A section that fails records its error and the run goes on with the next. No
weights are downloaded: the full-size models are built from their configs with random weights, the tokenizer
and processor come from a tiny folder made by `sphinx-mllm init` (same image geometry), the data from the demo's
generated world. Sections:

- `card`: device-to-device copy bandwidth and the bf16 matmul rate, the ceilings the other figures are read
  against;
- `numerics`: the parity fixtures (`tests/fixtures/parity`, original code's outputs recorded on a CPU)
  converted, then run on the device in float32 (TF32 off) and bfloat16;
- `inference`: SPHINX-1k at full size in bf16 (LLaMA-2-13B and the four encoders): one-image prefill and the
  encoders' share of it, eager decode against the same LLM driven as a plain `LlamaForCausalLM` and against the
  HBM bound, compiled static-cache decode (SPHINX and plain LLaMA compiled the same way), batch-8 decode;
- `lora`, `qlora`: `recipes/sft/lora.yaml` and `qlora.yaml` on that model through `modeling_sphinx.training.sft.train`
  (the model passed in memory; QLoRA quantized through `from_pretrained`), tokens/s and peak memory;
- `full_finetune`: `recipes/sft/full.yaml` on SPHINX-Tiny-1k at full size;
- `commands`: the user's commands on the device from a fresh tiny folder: `init`, `train` (smoke preset), `chat`,
  `chat --load-in-4bit`, `eval` and `serve` answering one request, none of them printing about kernels.

`--tiny` swaps every full-size model for its tiny counterpart and shortens every loop; on the CPU the compiled
decode uses dynamo's `eager` backend, so the dry run checks the plumbing of every section, not speed.
"""

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import modeling_sphinx  # noqa: F401  (first: its import guard must come before bitsandbytes, which Trainer imports)

# isort: split
from transformers import TrainerCallback
from transformers.generation.streamers import BaseStreamer

from modeling_sphinx.folder.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

QUESTION = "Please look at the image carefully and tell me which shapes you can see and what colour each one is."
BATCH_QUESTIONS = [
    "What colour is the circle?",
    "Where is the small dot?",
    "How many shapes are there?",
    "Describe the image.",
    "Please provide the bounding box of the square.",
    "What is at the top left?",
    "Is there a triangle in the image?",
    "What colour is the background?",
]


@dataclass(frozen=True)
class Scale:
    """How big the models are and how long each loop runs."""

    tiny: bool
    dtype: str  # of the full-size models; QLoRA always computes in bfloat16
    copy_mib: int
    matmul: int
    decode_tokens: int
    repeats: int
    train_steps: int
    train_images: int


FULL_SIZE = Scale(
    tiny=False,
    dtype="bfloat16",
    copy_mib=4096,
    matmul=8192,
    decode_tokens=32,
    repeats=3,
    train_steps=12,
    train_images=64,
)
TINY_SIZE = Scale(
    tiny=True, dtype="float32", copy_mib=64, matmul=256, decode_tokens=4, repeats=1, train_steps=2, train_images=8
)

# the targets of docs/gpu.md, judged on a full-size run: (what, key in the results, comparison, bound)
TARGETS = [
    ("eager decode / plain LLaMA eager", "inference.eager_vs_llama", ">=", 0.95),
    ("compiled decode / plain LLaMA compiled", "inference.compiled_vs_llama_compiled", ">=", 1 / 1.1),
    ("compiled decode / HBM bound", "inference.compiled_fraction_of_hbm_bound", ">=", 0.5),
    ("encoders / one-image prefill", "inference.encoder_share_of_prefill", "<=", 0.25),
    ("LoRA 13B tokens/s", "lora.tokens_per_s", ">=", 4500),
    ("LoRA 13B peak GiB", "lora.peak_gib", "<=", 40),
    ("QLoRA 13B peak GiB", "qlora.peak_gib", "<=", 24),
    ("commands offline, no kernel line", "commands.all_ok", "==", True),
]


class Context:
    """What the sections share: the device, the scale, a scratch folder, and what earlier sections measured."""

    def __init__(self, device: str, scale: Scale, scratch: Path, parity: Path):
        self.device, self.scale, self.scratch, self.parity = device, scale, scratch, parity
        self.dtype = getattr(torch, scale.dtype)
        self.results: dict[str, dict] = {}
        self._folders: dict[str, Path] = {}
        self._data = None
        self.model = None  # the full-size SPHINX-1k, shared by `inference` and `lora`

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeats: int | None = None) -> float:
        """Median seconds of `fn()` after one warm-up call."""
        fn()
        times = []
        for _ in range(repeats or self.scale.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def reset_peak(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else None

    def tiny_folder(self, variant: str = "sphinx-1k") -> Path:
        """A tiny folder of `variant`: its processor (the variant's image geometry) serves the full-size model."""
        if variant not in self._folders:
            from modeling_sphinx.folder.create import init_model

            self._folders[variant] = init_model(variant, self.scratch / f"tiny-{variant}", tiny=True)
        return self._folders[variant]

    def processor(self, variant: str = "sphinx-1k"):
        from modeling_sphinx.inference import load_processor

        return load_processor(str(self.tiny_folder(variant)))

    def data(self) -> Path:
        """A VQA + grounding mixture over the demo's generated images."""
        if self._data is None:
            from modeling_sphinx.miniature.recipe import mixture_file, write_split

            split = write_split(self.scratch / "world", "real", 0, self.scale.train_images)
            weights = {"vqa": 1, "referring_expression": 1}
            self._data = mixture_file(self.scratch / "mixture.yaml", [split], weights)
        return self._data

    def build(self, variant: str, dtype: torch.dtype | None = None):
        """A SPHINX model of `variant` (full size unless `--tiny`) with random weights, built on the device."""
        from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration
        from modeling_sphinx.folder.create import build_generation_config

        processor = self.processor(variant)
        tokenizer = processor.tokenizer
        text = {
            "vocab_size": len(tokenizer) if self.scale.tiny else 32001,  # LLaMA-2's 32,000 pieces and <image>
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        config = SphinxConfig.from_variant(
            variant, tiny=self.scale.tiny, text_config=text, image_token_id=processor.image_token_id
        )
        torch.manual_seed(0)
        with torch.device(self.device):
            model = SphinxForConditionalGeneration._from_config(config, dtype=dtype or self.dtype).eval()
        model.generation_config = build_generation_config(config, processor)
        return model, processor


def image():
    from modeling_sphinx.miniature.world import render

    return render(0, "real")[0]


def chat_batch(model, processor, questions: list[str]):
    from modeling_sphinx.inference import chat_inputs, user_turn

    return chat_inputs(model, processor, [[user_turn(question, image())] for question in questions])


# ---------------------------------------------------------------------------------------------------- sections


def card(ctx: Context) -> dict:
    elements = ctx.scale.copy_mib * 2**20 // 2
    source = torch.empty(elements, dtype=torch.bfloat16, device=ctx.device)
    target = torch.empty_like(source)
    copy = ctx.timed(lambda: target.copy_(source), repeats=10)
    n = ctx.scale.matmul
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=ctx.device) for _ in range(2))
    matmul = ctx.timed(lambda: a @ b, repeats=10)
    return {
        "copy_tb_per_s": 2 * source.nbytes / copy / 1e12,  # bytes read and written
        "bf16_matmul_tflop_per_s": 2 * n**3 / matmul / 1e12,
        "matmul_size": n,
    }


def numerics(ctx: Context) -> dict:
    from safetensors.torch import load_file

    from modeling_sphinx import SphinxForConditionalGeneration
    from modeling_sphinx.folder.convert import convert_checkpoint

    fixtures = sorted(path for path in ctx.parity.glob("*") if (path / "manifest.json").is_file())
    if not fixtures:
        raise FileNotFoundError(f"no parity fixtures in {ctx.parity} (--parity)")
    found = {}
    for fixture in fixtures:
        manifest = json.loads((fixture / "manifest.json").read_text())
        folder = convert_checkpoint(
            fixture / "checkpoint",
            ctx.scratch / "parity" / fixture.name,
            dtype="float32",
            encoder_sizes=manifest["size_changes_vs_real_model"],
        )
        model = SphinxForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).to(ctx.device).eval()
        row = {"float32_max_abs_diff": 0.0, "bf16_relative_l2": 0.0, "bf16_greedy_equal": 0, "greedy_tokens": 0}
        references = [
            {key: value.to(ctx.device) for key, value in load_file(path).items()}
            for path in sorted(fixture.glob("reference_*.safetensors"))
        ]
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        for dtype in (torch.float32, torch.bfloat16):  # float32 first: a model cast to bf16 cannot go back
            model.to(dtype)
            for reference in references:
                ids, pixels = recorded_inputs(reference, model.config)
                pixels, expected = pixels.to(dtype), reference["logits_forward"][0].float()
                with torch.inference_mode():
                    logits = model(input_ids=ids, pixel_values=pixels).logits[0, model.config.num_image_tokens :]
                    logits = logits[:, : expected.shape[-1]].float()
                    if dtype == torch.float32:
                        difference = (logits - expected).abs().max().item()
                        row["float32_max_abs_diff"] = max(row["float32_max_abs_diff"], difference)
                        continue
                    relative = ((logits - expected).norm() / expected.norm()).item()
                    row["bf16_relative_l2"] = max(row["bf16_relative_l2"], relative)
                    wanted = reference["generated_ids"]
                    greedy = model.generate(
                        input_ids=ids,
                        pixel_values=pixels,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=len(wanted),
                        min_new_tokens=len(wanted),
                        do_sample=False,
                        separator_token_ids=[],
                    )[0, ids.shape[1] :]
                row["bf16_greedy_equal"] += int((greedy == wanted).sum())
                row["greedy_tokens"] += len(wanted)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        found[fixture.name] = row
        del model
    return {"fixtures": found}


def recorded_inputs(reference: dict, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The recorded prompt with the image's placeholders after BOS, and the recorded pixels (rebuilt from the
    uint8 image as the fixtures' README says when only those were stored)."""
    ids = reference["input_ids"]
    placeholders = torch.full((1, config.num_image_tokens), config.image_token_id, device=ids.device)
    ids = torch.cat([ids[:, :1], placeholders, ids[:, 1:]], dim=1)
    pixels = reference.get("pixel_values")
    if pixels is None:
        from modeling_sphinx.modeling_sphinx import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        mean, std = (torch.tensor(v, device=ids.device).view(3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
        pixels = ((reference["pixel_values_uint8"].permute(2, 0, 1).float() / 255 - mean) / std)[None]
    return ids, pixels


class StepClock(BaseStreamer):
    """Stamps the host clock each time `generate` hands over tokens: once for the prompt, once after the prefill,
    then once per decode step. Handing tokens over copies them to the host, so each stamp waits for the device."""

    def __init__(self, ctx: Context):
        self.ctx, self.stamps = ctx, []

    def put(self, value):
        self.ctx.sync()
        self.stamps.append(time.perf_counter())

    def end(self):
        """Nothing is held back to flush."""

    def decode_steps(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.stamps[1:], self.stamps[2:], strict=False)]


def decode_seconds_per_token(ctx: Context, model, inputs: dict, **generation) -> float:
    """Median seconds of one greedy decode step (the prefill and its first token left out), over the n steps of each of
    `repeats` calls with `max_new_tokens=n+1`, after one warm-up call. A median of steps is never negative, unlike
    a difference of two whole `generate` timings, which on a loaded CPU can be."""
    new = ctx.scale.decode_tokens + 1
    steps = []
    with torch.inference_mode():
        for call in range(1 + ctx.scale.repeats):
            clock = StepClock(ctx)
            model.generate(
                **inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock, **generation
            )
            if call:  # the first call warms up
                steps.extend(clock.decode_steps())
    return statistics.median(steps)


def compile_settings(ctx: Context) -> dict:
    from transformers import CompileConfig

    if ctx.device == "cuda":
        return {"cache_implementation": "static", "compile_config": CompileConfig(fullgraph=True)}
    config = CompileConfig(backend="eager", fullgraph=True, dynamic=False)  # no C compiler needed
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return {"cache_implementation": "static", "compile_config": config}


def encoder_compile_settings(ctx: Context) -> dict:
    """The encoders captured in CUDA graphs (dynamo's `cudagraphs` backend: no code generation, so it compiles in
    seconds): one replay instead of ~1,650 kernel launches. On the CPU, dynamo's `eager` backend (the dry run)."""
    return {"backend": "cudagraphs" if ctx.device == "cuda" else "eager"}


def plain_llama(model):
    """The same LLM modules (no copy) driven as a plain `LlamaForCausalLM`."""
    from transformers import GenerationConfig, LlamaForCausalLM

    with torch.device("meta"):
        llama = LlamaForCausalLM(model.config.text_config)
    llama.model, llama.lm_head = model.model.language_model, model.lm_head
    llama.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=None, bos_token_id=1)
    return llama.eval()


def hbm_bound_seconds(ctx: Context, model, tokens: int) -> float:
    """One decode step reads every LLM weight but the input embedding, and the KV cache, once."""
    text = model.config.text_config
    weights = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
    weights += model.lm_head.weight.nbytes - model.model.language_model.embed_tokens.weight.nbytes
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * tokens * model.lm_head.weight.itemsize
    bandwidth = ctx.results.get("card", {}).get("copy_tb_per_s") or card(ctx)["copy_tb_per_s"]
    return (weights + cache) / (bandwidth * 1e12)


def inference(ctx: Context) -> dict:
    ctx.reset_peak()
    built = time.perf_counter()
    model, processor = ctx.build("sphinx-1k")
    ctx.sync()
    found = {"build_s": time.perf_counter() - built}
    ctx.model = model
    found["parameters_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    found["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    inputs = chat_batch(model, processor, [QUESTION])
    length = inputs["input_ids"].shape[1]
    found["prompt_tokens"] = length
    with torch.inference_mode():
        found["prefill_s"] = ctx.timed(lambda: model(**inputs, use_cache=False, logits_to_keep=1))
        found["encoders_s"] = ctx.timed(lambda: model.get_image_features(inputs["pixel_values"]))
    found["encoder_share_of_prefill"] = found["encoders_s"] / found["prefill_s"]
    graphed = torch.compile(model.get_image_features, fullgraph=True, **encoder_compile_settings(ctx))
    with torch.inference_mode():
        found["encoders_cuda_graphs_s"] = ctx.timed(lambda: graphed(inputs["pixel_values"]))
    llm = found["prefill_s"] - found["encoders_s"]
    found["encoder_share_with_cuda_graphs"] = found["encoders_cuda_graphs_s"] / (llm + found["encoders_cuda_graphs_s"])

    llama = plain_llama(model)
    ids = torch.randint(3, min(1000, model.config.text_config.vocab_size - 1), (1, length), device=ctx.device)
    llama_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    found["eager_ms_per_token"] = 1e3 * decode_seconds_per_token(ctx, model, inputs)
    found["llama_eager_ms_per_token"] = 1e3 * decode_seconds_per_token(ctx, llama, llama_inputs)
    found["eager_vs_llama"] = found["llama_eager_ms_per_token"] / found["eager_ms_per_token"]
    found["hbm_bound_ms_per_token"] = 1e3 * hbm_bound_seconds(ctx, model, length + ctx.scale.decode_tokens // 2)
    found["eager_fraction_of_hbm_bound"] = found["hbm_bound_ms_per_token"] / found["eager_ms_per_token"]

    compiled = compile_settings(ctx)
    for name, runner, runner_inputs in (("", model, inputs), ("llama_", llama, llama_inputs)):
        started = time.perf_counter()
        with torch.inference_mode():
            new = ctx.scale.decode_tokens + 1  # the static cache of the timed calls: the same shapes, no recompiling
            runner.generate(**runner_inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, **compiled)
        ctx.sync()
        found[f"{name}compile_first_call_s"] = time.perf_counter() - started
        found[f"{name}compiled_ms_per_token"] = 1e3 * decode_seconds_per_token(ctx, runner, runner_inputs, **compiled)
    found["compiled_vs_llama_compiled"] = found["llama_compiled_ms_per_token"] / found["compiled_ms_per_token"]
    found["compiled_fraction_of_hbm_bound"] = found["hbm_bound_ms_per_token"] / found["compiled_ms_per_token"]
    found["compiled_speedup_over_eager"] = found["eager_ms_per_token"] / found["compiled_ms_per_token"]

    batch = chat_batch(model, processor, BATCH_QUESTIONS)
    with torch.inference_mode():
        found["batch8_prefill_s"] = ctx.timed(
            lambda: model.generate(**batch, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        )
    step = decode_seconds_per_token(ctx, model, batch)
    found["batch8_ms_per_step"] = 1e3 * step
    found["batch8_tokens_per_s"] = len(BATCH_QUESTIONS) / step
    found["peak_gib"] = ctx.peak_gib()
    return found


class StepTimer(TrainerCallback):
    """Times every optimizer step on the device and counts the tokens it read."""

    def __init__(self, ctx: Context):
        self.ctx, self.seconds, self.tokens, self._start, self._seen = ctx, [], [], 0.0, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.ctx.sync()
        self._start, self._seen = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        self.ctx.sync()
        self.seconds.append(time.perf_counter() - self._start)
        self.tokens.append(state.num_input_tokens_seen - self._seen)


def tune(ctx: Context, recipe: str, model, processor, name: str, variant: str = "sphinx-1k") -> dict:
    """`recipes/sft/RECIPE` on `model` through `modeling_sphinx.training.sft.train`: tokens/s (median over the steps
    after the first), seconds per step, peak memory and the losses."""
    from modeling_sphinx.training.sft import make_parser, train

    out = ctx.scratch / name
    overrides = {
        "model_name_or_path": str(ctx.tiny_folder(variant)),
        "mixture": str(ctx.data()),
        "output_dir": str(out),
        "max_steps": str(ctx.scale.train_steps),
        "gradient_accumulation_steps": "1",
        "save_strategy": "no",
        "save_final_model": "false",
        "logging_steps": "1",
        "dataloader_num_workers": "0",
        "include_num_input_tokens_seen": "true",  # every token of the padded batch
    }
    if ctx.device == "cpu":
        overrides.update(use_cpu="true", bf16="false")
        if recipe != "qlora.yaml":
            overrides.update(dtype="float32")
    argv = ["--config", str(REPO / "recipes" / "sft" / recipe)]
    for key, value in overrides.items():
        argv += [f"--{key}", value]
    args, training_args = make_parser().parse_args_and_config(args=argv)
    timer = StepTimer(ctx)
    visual_tokens = model.config.num_image_tokens
    ctx.reset_peak()
    train(args, training_args, progress=name, model=model, processor=processor, callbacks=[timer])
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    after_first = range(1, len(timer.seconds)) if len(timer.seconds) > 1 else range(len(timer.seconds))
    return {
        "steps": len(timer.seconds),
        "batch": training_args.per_device_train_batch_size,
        "visual_tokens_per_sample": visual_tokens,
        "tokens_per_step": statistics.median(timer.tokens[i] for i in after_first),
        "seconds_per_step": statistics.median(timer.seconds[i] for i in after_first),
        "tokens_per_s": statistics.median(timer.tokens[i] / timer.seconds[i] for i in after_first),
        "peak_gib": ctx.peak_gib(),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def lora(ctx: Context) -> dict:
    model = ctx.model
    if model is None:
        model, _ = ctx.build("sphinx-1k")
    ctx.model = None  # PEFT wraps it in place
    return tune(ctx, "lora.yaml", model, ctx.processor(), "lora")


def qlora(ctx: Context) -> dict:
    """The LLM quantized to NF4 by `from_pretrained`, from the state of a model built on the device."""
    from modeling_sphinx import SphinxForConditionalGeneration
    from modeling_sphinx.inference import four_bit_config

    built, processor = ctx.build("sphinx-1k", dtype=torch.bfloat16)
    state, config = built.state_dict(), built.config
    del built
    model = SphinxForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=state,
        dtype=torch.bfloat16,
        quantization_config=four_bit_config(torch.bfloat16),
        device_map={"": ctx.device},
    )
    del state
    found = {"quantized_weights_gib": model.get_memory_footprint() / 2**30}
    return found | tune(ctx, "qlora.yaml", model, processor, "qlora")


def full_finetune(ctx: Context) -> dict:
    model, processor = ctx.build("sphinx-tiny-1k")
    found = {"parameters_b": sum(p.numel() for p in model.parameters()) / 1e9}
    return found | tune(ctx, "full.yaml", model, processor, "full", variant="sphinx-tiny-1k")


def commands(ctx: Context) -> dict:
    """The user's commands from a fresh folder, each in its own process as a user runs them."""
    folder = ctx.scratch / "commands"
    folder.mkdir(exist_ok=True)
    tiny, picture = folder / "tiny", folder / "image.png"
    image().save(picture)
    split = Path(ctx.data()).parent / "world" / "real-0"
    on_device = ["--device-map", ctx.device] if ctx.device == "cuda" else []
    chat = ["chat", str(tiny), "--image", str(picture), "--prompt", QUESTION, "--max-new-tokens", "8", *on_device]
    train_on_device = ["--use_cpu", "false", "--bf16", "true", "--dtype", "bfloat16"] if ctx.device == "cuda" else []
    runs = {
        "init": ["init", "--variant", "sphinx-1k", "--tiny", str(tiny)],
        "train": ["train", str(REPO / "recipes" / "sft" / "smoke.yaml"), "--model_name_or_path", str(tiny),
                  "--mixture", str(ctx.data()), "--output_dir", str(folder / "train"), "--max_steps", "2",
                  "--save_steps", "2", *train_on_device],
        "chat": chat,
        "chat --load-in-4bit": [*chat, "--load-in-4bit", "--dtype", "bfloat16"],
        "eval": ["eval", str(tiny), "--task", "vqa", "--data", str(split / "vqa.jsonl"), "--limit", "4",
                 "--max-new-tokens", "8", "--out", str(folder / "eval"), *on_device],
    }  # fmt: skip
    found = {}
    for name, argv in runs.items():
        started = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "sphinx_mllm_cli", *argv], capture_output=True, text=True, cwd=folder, timeout=600
        )
        found[name] = command_outcome(run.returncode, run.stdout + run.stderr, time.perf_counter() - started)
    found["serve"] = serve_one_request(tiny, picture, on_device)
    found["all_ok"] = all(outcome["ok"] for outcome in found.values())
    return found


def command_outcome(returncode: int, printed: str, seconds: float, error: str = "") -> dict:
    lines = printed.strip().splitlines()
    kernel_lines = [line for line in lines if "kernel" in line.lower()]
    ok = returncode == 0 and not kernel_lines and not error
    return {
        "ok": ok,
        "exit": returncode,
        "seconds": seconds,
        "kernel_lines": kernel_lines[:3],
        "error": error or ("" if returncode == 0 else (lines[-1] if lines else "")),
    }


def serve_one_request(model: Path, picture: Path, on_device: list[str]) -> dict:
    """`sphinx-mllm serve` started in its own process, answering one request through `gradio_client`."""
    started = time.perf_counter()
    try:
        from gradio_client import Client, handle_file
    except ImportError:
        return {"ok": False, "exit": None, "seconds": 0.0, "kernel_lines": [], "error": "skipped: no gradio_client"}
    from bench_serve_load import free_port, start

    port = free_port()
    with tempfile.TemporaryFile(mode="w+") as log:
        server = start(model, port, *on_device, output=log)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False)
            answer = client.predict(handle_file(str(picture)), QUESTION, 8, False, 0.7, 0.9, api_name="/answer")
            error = "" if answer else "empty answer"
        except Exception as failure:  # recorded; the suite goes on
            error = f"{type(failure).__name__}: {failure}"
        finally:
            server.terminate()
            server.wait(timeout=60)
        log.seek(0)
        return command_outcome(0, log.read(), time.perf_counter() - started, error)


SECTIONS = {
    "card": card,
    "numerics": numerics,
    "inference": inference,
    "lora": lora,
    "qlora": qlora,
    "full_finetune": full_finetune,
    "commands": commands,
}


# ----------------------------------------------------------------------------------------------------- report


def environment(device: str) -> dict:
    import importlib.metadata

    packages = ("torch", "transformers", "trl", "peft", "accelerate", "timm", "bitsandbytes", "kernels", "sphinx-mllm")
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    card_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": card_name,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "python": platform.python_version(),
        "versions": versions,
    }


def lookup(results: dict, key: str):
    section, field = key.split(".")
    return results.get(section, {}).get(field)


def judged(value, comparison: str, bound) -> str:
    if value is None:
        return "not measured"
    met = {">=": value >= bound, "<=": value <= bound, "==": value == bound}[comparison]
    return "met" if met else "not met"


def figure(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def markdown(report: dict) -> str:
    env, results = report["environment"], report["results"]
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    lines = [
        f"# GPU suite: {env['date']}, {env['device']}" + (" (tiny dry run)" if report["tiny"] else ""),
        "",
        f"{versions}; Python {env['python']}" + (f", CUDA {env['cuda']}" if env["cuda"] else ""),
        "",
        "| section | status | seconds |",
        "|---|---|---|",
    ]
    for name, section in report["sections"].items():
        status = section["status"] + (f": {section['error']}" if section.get("error") else "")
        lines.append(f"| {name} | {status} | {section['seconds']:.1f} |")
    lines += ["", "| target | measured | bound | verdict |", "|---|---|---|---|"]
    for what, key, comparison, bound in TARGETS:
        value = lookup(results, key)
        verdict = "not judged (tiny)" if report["tiny"] else judged(value, comparison, bound)
        lines.append(
            f"| {what} | {figure(value) if value is not None else '—'} | {comparison} {figure(bound)} | {verdict} |"
        )
    for name, found in results.items():
        lines += ["", f"## {name}", "", "| figure | value |", "|---|---|"]
        for key, value in flatten(found):
            lines.append(f"| {key} | {figure(value)} |")
    return "\n".join(lines) + "\n"


def flatten(found: dict, prefix: str = ""):
    for key, value in found.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def run(device: str, scale: Scale, out: Path, sections: list[str], parity: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report = {"tiny": scale.tiny, "scale": asdict(scale), "environment": environment(device), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as scratch:
        ctx = Context(device, scale, Path(scratch), parity)
        for name in sections:
            started = time.perf_counter()
            try:
                ctx.results[name] = SECTIONS[name](ctx)
                status = {"status": "ok"}
            except (Exception, SystemExit) as failure:  # recorded; the suite goes on with the next section
                status = {"status": "failed", "error": f"{type(failure).__name__}: {failure}".splitlines()[0]}
                status["traceback"] = traceback.format_exc().splitlines()[-8:]
            status["seconds"] = time.perf_counter() - started
            report["sections"][name] = status
            print(f"{name}: {status['status']} in {status['seconds']:.1f} s", flush=True)
            if name == "lora":
                ctx.model = None
            ctx.reset_peak()
        report["results"] = ctx.results
    write_text_atomic(out / "results.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text_atomic(out / "results.md", markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and short loops (the test suite's dry run)")
    parser.add_argument("--out", default="runs/gpu-suite", help="folder for results.json and results.md")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--parity", default=str(REPO / "tests" / "fixtures" / "parity"), help="parity fixtures")
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        print(
            f"gpu_suite: error: unknown section {unknown[0]!r}; the sections are {', '.join(SECTIONS)}",
            file=sys.stderr,
        )
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA GPU (the CPU dry run is --device cpu --tiny)")
        return 0
    report = run(args.device, TINY_SIZE if args.tiny else FULL_SIZE, Path(args.out), sections, Path(args.parity))
    print(markdown(report))
    failed = [name for name, section in report["sections"].items() if section["status"] != "ok"]
    print(
        f"wrote {Path(args.out) / 'results.json'} and results.md"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
