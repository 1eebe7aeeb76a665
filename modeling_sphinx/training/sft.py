"""Multi-task visual instruction tuning of SPHINX with TRL's `SFTTrainer` (full, LoRA or QLoRA).

`main(argv)` is what `sphinx-mllm train CONFIG.yaml` and `recipes/sft/sft_sphinx.py` run: `TrlParser` reads
`SphinxTuningArguments` and TRL's `SFTConfig` from the YAML (`--config`) and the command line, the task
mixture is built with `modeling_sphinx.training.mixtures.load_mixture`, and the result is saved as a complete model
folder (LoRA merged back) that loads with `AutoModelForImageTextToText` and pushes with `sphinx-mllm push`.

What SPHINX needs beyond TRL's defaults, and why:
- `SphinxDataCollator` masks every `<image>` position out of the labels: TRL's fused LM head computes the loss
  without calling `SphinxForConditionalGeneration.forward`, whose own masking therefore never runs.
- `max_length` must hold every sample's visual tokens (1455 per SPHINX-1k image, all right after BOS); a sample
  that cannot fit is refused by name instead of being cut.
- `remove_unused_columns` is off so that the collator still sees each sample's `id` for its errors.
- LoRA targets the LLM's linear layers only (the towers use other names but `all-linear` would reach them); the
  projectors are trained through `modules_to_save` and the start/end embeddings as plain parameters saved with
  every checkpoint (`image_boundaries.safetensors`), since PEFT can only save modules.
- QLoRA quantizes the LLM alone: the towers, projectors and `lm_head` stay in 16-bit (`four_bit_config`).
- On a CPU, TRL's fused LM head projects only the labelled positions, as it does on GPUs
  (`labelled_positions_only`): SPHINX labels few of its positions, the visual tokens never.
"""

import logging
import shutil
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from safetensors.torch import load_file, save_file
from transformers import BatchFeature, TrainerCallback
from transformers.image_utils import make_flat_list_of_images
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from ..folder.atomic import STAGING_SUFFIX, human_size, is_full_disk, staging_sibling
from ..folder.card import hub_reference
from ..folder.create import save_model_folder
from ..folder.dtypes import dtype_named
from ..inference import four_bit_config, load_model, load_processor
from ..records import open_image
from .mixtures import load_mixture


class _SeparatorEndsTheTurn(logging.Filter):
    """Drops TRL's warning that the chat template leaves the end-of-turn token out of the loss mask.

    TRL looks for an added special token at the end of the assistant's masked span; SPHINX ends a turn with the
    plain-text separator `\n###` instead, which the mask covers (`test_labels_supervise_exactly_the_answers`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "end-of-turn token in the loss mask" not in record.getMessage()


SEPARATOR_ENDS_THE_TURN = _SeparatorEndsTheTurn()  # added to TRL's logger by `train`

LLM_LINEAR_LAYERS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
PROJECTOR_LAYERS = ("visual_proj.0", "visual_proj.1", "qformer_proj.0", "qformer_proj.1")
IMAGE_BOUNDARIES = ("model.start_img", "model.end_img")
BOUNDARY_FILE = "image_boundaries.safetensors"


@dataclass
class SphinxTuningArguments(ModelConfig):
    """What to tune and on which data; the rest of a run is TRL's `SFTConfig`.

    TRL's `ModelConfig` says the model, its dtype, revision and attention, the LoRA settings and the 4-bit ones,
    with SPHINX's defaults where they differ (`dtype` bfloat16, nested quantisation on, LoRA on the LLM's linear
    layers). `tuning` (full, lora or qlora) is the short way to say TRL's `use_peft` and `load_in_4bit`; either
    spelling works. The fields below are SPHINX's own.
    """

    dtype: str | None = field(
        default="bfloat16", metadata={"help": "dtype of the weights: bfloat16, float16, float32"}
    )
    use_bnb_nested_quant: bool = field(default=True, metadata={"help": "QLoRA: quantize the quantization constants"})
    mixture: str | None = field(
        default=None, metadata={"help": "task mixture YAML (modeling_sphinx.training.mixtures.read_mixture)"}
    )
    eval_mixture: str | None = field(default=None, metadata={"help": "held-out task mixture YAML"})
    tuning: str | None = field(
        default=None, metadata={"help": "full, lora or qlora (default: from use_peft, load_in_4bit)"}
    )
    train_projectors: bool = field(default=True, metadata={"help": "train the projectors and start/end embeddings"})
    streaming: bool = field(default=False, metadata={"help": "stream the mixture (needs max_steps)"})
    image_cache_size: int = field(
        default=0,
        metadata={"help": "images kept decoded and preprocessed between batches (0: read every time)"},
    )
    feature_cache_size: int = field(
        default=0,
        metadata={
            "help": "images whose frozen encoders' features are kept between steps (0: encode every step); "
            "not with FSDP or DeepSpeed"
        },
    )
    model_dir: str | None = field(default=None, metadata={"help": "final model folder (default OUTPUT_DIR/model)"})
    save_final_model: bool = field(
        default=True,
        metadata={"help": "write the final model folder (off: only checkpoints and trainer_state.json)"},
    )
    use_kernels: bool = field(
        default=False,
        metadata={"help": "let transformers swap layers for Hub kernels, downloaded at first use (needs the Hub)"},
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("model_name_or_path", "mixture"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required (in the recipe or as --{name.replace('_', '-')})")
        implied = "qlora" if self.load_in_4bit else "lora" if self.use_peft else "full"
        if self.tuning is None:
            self.tuning = implied
        if self.tuning not in ("full", "lora", "qlora"):
            raise ValueError(f"tuning must be full, lora or qlora, got {self.tuning!r}")
        if (self.use_peft or self.load_in_4bit) and implied != self.tuning:
            raise ValueError(
                f"tuning: {self.tuning} contradicts use_peft: {self.use_peft}, load_in_4bit: {self.load_in_4bit}"
            )
        self.use_peft, self.load_in_4bit = self.tuning != "full", self.tuning == "qlora"
        if self.load_in_8bit:
            raise ValueError("8-bit loading is not a tuning mode here: use tuning: qlora (the LLM in 4-bit)")
        dtype_named(self.dtype)
        if self.tuning == "qlora" and self.dtype != "bfloat16":
            # TRL casts the trainable parameters of a quantized model to bfloat16; the rest must match them
            raise ValueError(f"QLoRA trains in bfloat16: set dtype: bfloat16 (got {self.dtype})")


@dataclass
class SphinxDataCollator(DataCollatorForVisionLanguageModeling):
    """TRL's vision collator that never supervises `<image>` positions and refuses samples too long to keep.

    `image_cache_size`: how many images (given as paths) to keep between batches, decoded and preprocessed, the
    least recently used dropped first. 0 opens and preprocesses every image of every batch; a small image set
    trained for many epochs (the demo's 1,600 PNGs: 180 MB decoded, 960 MB of pixel values) is read once."""

    image_cache_size: int = 0

    def __post_init__(self):
        self._decoded: OrderedDict[tuple, PIL.Image.Image] = OrderedDict()
        # the processor's pixel values of each kept image, by the identity of its decoded image: those stay alive
        # in `_decoded` for as long as their entry here, so no other image can take their `id`
        self._pixels: dict[int, torch.Tensor | None] = {}

    def __getstate__(self):
        # a copy (in a DataLoader worker) starts with empty caches: pixel values are found by the identity of their
        # decoded image, which a copy does not keep, so a copied entry could be given to another image
        return {**self.__dict__, "_decoded": OrderedDict(), "_pixels": {}}

    def _image(self, value):
        if self.image_cache_size <= 0 or not isinstance(value, (str, Path)):
            return value
        stat = Path(value).stat()
        key = (str(value), stat.st_mtime_ns, stat.st_size)  # an image rewritten in place is decoded again
        if key in self._decoded:
            self._decoded.move_to_end(key)
        else:
            image = self._decoded[key] = open_image(value)
            self._pixels[id(image)] = None
            if len(self._decoded) > self.image_cache_size:
                _, dropped = self._decoded.popitem(last=False)
                del self._pixels[id(dropped)]
        return self._decoded[key]

    def torch_call(self, examples: list[dict]) -> dict:
        for example in examples:
            if example.get("images"):
                example["images"] = [self._image(image) for image in example["images"]]
        if self.max_length is not None:
            per_image = self.processor.num_image_tokens
            for example in examples:
                images = example.get("images") or ([example["image"]] if example.get("image") is not None else [])
                needed = 1 + len(images) * per_image
                if needed > self.max_length:
                    raise ValueError(
                        f"sample {example.get('id', '(no id)')}: its {len(images)} image(s) need {needed} positions "
                        f"(BOS + {per_image} visual tokens each) but max_length is {self.max_length}; raise "
                        "max_length or drop the sample"
                    )
        image_processor = self.processor.image_processor
        if self.image_cache_size > 0:
            self.processor.image_processor = _KeptPixels(image_processor, self._pixels)
        try:
            batch = super().torch_call(examples)
        finally:
            self.processor.image_processor = image_processor
        batch["labels"][batch["input_ids"] == self.processor.image_token_id] = -100
        return batch


class _KeptPixels:
    """The collator's image processor, preprocessing each kept image once (SPHINX's processor gives every image
    its own row of `pixel_values`, the same whatever images share its batch); any image the collator does not
    keep sends the whole call to the processor itself."""

    def __init__(self, image_processor, pixels: dict[int, torch.Tensor | None]):
        self.image_processor = image_processor
        self.pixels = pixels

    def __getattr__(self, name):
        return getattr(self.image_processor, name)

    def __call__(self, images, **kwargs):
        flat = make_flat_list_of_images(images)
        if kwargs.get("return_tensors") != "pt" or not all(id(image) in self.pixels for image in flat):
            return self.image_processor(images, **kwargs)
        missing = list({id(image): image for image in flat if self.pixels[id(image)] is None}.values())
        if missing:
            processed = self.image_processor(missing, **kwargs)
            if set(processed) != {"pixel_values"}:  # another processor's output: nothing to keep per image
                return self.image_processor(images, **kwargs)
            for image, row in zip(missing, processed["pixel_values"], strict=True):
                self.pixels[id(image)] = row.clone()  # its own storage, freed with its image
        return BatchFeature({"pixel_values": torch.stack([self.pixels[id(image)] for image in flat])}, "pt")


class ImageBoundaryCheckpoints(TrainerCallback):
    """Saves the start/end image embeddings in every checkpoint of a PEFT run, and restores them on resume."""

    def __init__(self, model):
        self.model = model

    def tracked(self) -> dict[str, torch.nn.Parameter]:
        """The start/end embeddings by their base-model name (`model.start_img`, `model.end_img`)."""
        named = dict(self.model.named_parameters())
        return {name: named[key] for name in IMAGE_BOUNDARIES for key in named if key.endswith(name)}

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tensors = {name: p.detach().cpu().contiguous() for name, p in self.tracked().items()}
            save_file(tensors, folder / BOUNDARY_FILE)

    def restore(self, checkpoint: str | Path):
        saved = load_file(Path(checkpoint) / BOUNDARY_FILE)
        with torch.no_grad():
            for name, parameter in self.tracked().items():
                parameter.copy_(saved[name].to(parameter.dtype))


def load_model_to_tune(args: SphinxTuningArguments):
    """The model to tune, in `args.dtype`; for QLoRA with its LLM in 4-bit (`args`' bnb settings)."""
    quantization = None
    if args.tuning == "qlora":
        quantization = four_bit_config(
            dtype_named(args.dtype),
            quant_type=args.bnb_4bit_quant_type,
            double_quant=args.use_bnb_nested_quant,
            storage_dtype=dtype_named(args.bnb_4bit_quant_storage) if args.bnb_4bit_quant_storage else None,
        )
    return load_model(
        args.model_name_or_path,
        dtype=args.dtype,
        load_in_4bit=quantization is not None,
        quantization_config=quantization,
        use_kernels=args.use_kernels,
        revision=args.model_revision,
        attn_implementation=args.attn_implementation,
    )


class StageProgress(ProgressCallback):
    """One named progress bar for the run and nothing else on the console (the logged losses still go to
    `trainer_state.json`)."""

    def __init__(self, description: str):
        super().__init__()
        self.description = description

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, desc=self.description, dynamic_ncols=True)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def lora_config(args: SphinxTuningArguments, model):
    """PEFT's `LoraConfig` for `model` from `args` (`None` for full tuning): the LLM's linear layers unless
    `lora_target_modules` says otherwise, and the projectors saved whole when `train_projectors`."""
    if args.tuning == "full":
        return None
    from peft import LoraConfig

    present = {name for name, _ in model.named_modules()}
    projectors = [name for name in PROJECTOR_LAYERS if f"model.{name}" in present] if args.train_projectors else []
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        # the LLM's linear layers by default: "all-linear" would reach the towers too
        target_modules=args.lora_target_modules or LLM_LINEAR_LAYERS,
        target_parameters=args.lora_target_parameters,
        modules_to_save=[*projectors, *(args.lora_modules_to_save or [])] or None,
        task_type=args.lora_task_type,
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
    )


def check_max_length(training_args: SFTConfig, processor):
    needed = 1 + processor.num_image_tokens
    if training_args.max_length is not None and training_args.max_length < needed:
        raise ValueError(
            f"max_length {training_args.max_length} cannot hold one image: SPHINX puts BOS and "
            f"{processor.num_image_tokens} visual tokens before the text; use at least {needed} (the model's context, "
            "e.g. 4096, is safe)"
        )


class SphinxSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer` whose checkpoints appear only when complete.

    transformers writes `checkpoint-N` in place, so a process killed while saving leaves a folder that resuming
    picks as the last checkpoint and then fails on. Here each checkpoint is written under a hidden
    `.checkpoint-N.partial` folder of the run, renamed into place once every process has finished writing it, and
    the rotation of old checkpoints runs after that.
    """

    _staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_sibling(run_dir / name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = run_dir / name
            if target.exists():  # the same step saved again after a resume
                shutil.rmtree(target)
            (staging / name).rename(target)
            shutil.rmtree(staging)
            best = self.state.best_model_checkpoint
            if best is not None and best.startswith(str(staging)):
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint, True)
        self.accelerator.wait_for_everyone()


def train(
    args: SphinxTuningArguments,
    training_args: SFTConfig,
    progress: str | None = None,
    model=None,
    processor=None,
    callbacks: list[TrainerCallback] | None = None,
) -> Path | None:
    """Run one fine-tuning job; returns the folder of the final, complete model (`None` with
    `save_final_model` off).

    `progress`: show one progress bar with this name instead of Trainer's bar and printed logs.
    `model`, `processor`: tune this model (and tokenize with this processor) instead of loading them from
    `args.model_name_or_path`, e.g. a model built from a config on the GPU, or one quantized or placed by the
    caller. The model is tuned as it is: `args.dtype` and `use_kernels` do not apply to it, and QLoRA expects its
    LLM already in 4-bit (`modeling_sphinx.inference.four_bit_config`). A QLoRA run merges its adapter into a
    16-bit copy loaded from `args.model_name_or_path`, so that must name the same weights.
    `callbacks`: more `TrainerCallback`s for the trainer (e.g. to time steps)."""
    logging.getLogger("trl.trainer.sft_trainer").addFilter(SEPARATOR_ENDS_THE_TURN)
    processor = (
        processor if processor is not None else load_processor(args.model_name_or_path, revision=args.model_revision)
    )
    check_max_length(training_args, processor)
    if args.streaming and training_args.max_steps <= 0:
        raise ValueError("a streamed mixture has no length: set max_steps")
    train_dataset = load_mixture(args.mixture, streaming=args.streaming)
    eval_dataset = load_mixture(args.eval_mixture) if args.eval_mixture else None
    training_args.remove_unused_columns = False
    model = model if model is not None else load_model_to_tune(args)
    if args.feature_cache_size:
        if training_args.fsdp or training_args.deepspeed:
            raise ValueError(
                "feature_cache_size needs every rank to run the encoders on its own, which FSDP and DeepSpeed "
                "do not allow (a rank that skips them waits for the others forever); set it to 0"
            )
        model.keep_frozen_features(args.feature_cache_size)
    peft_config = lora_config(args, model)
    collator = SphinxDataCollator(
        processor=processor,
        max_length=training_args.max_length,
        assistant_only_loss=training_args.assistant_only_loss,
        pad_to_multiple_of=training_args.pad_to_multiple_of,
        image_cache_size=args.image_cache_size,
    )
    trainer = SphinxSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=collator,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if progress is not None:
        for default in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(default)
        trainer.add_callback(StageProgress(progress))
    boundaries = None
    if peft_config is not None and args.train_projectors:
        boundaries = ImageBoundaryCheckpoints(trainer.model)
        for parameter in boundaries.tracked().values():
            parameter.requires_grad_(True)
        trainer.add_callback(boundaries)
    resume = training_args.resume_from_checkpoint
    if resume and boundaries is not None:
        boundaries.restore(resume)
    try:
        with labelled_positions_only():
            trainer.train(resume_from_checkpoint=resume)
        trainer.save_state()  # OUTPUT_DIR/trainer_state.json: the loss curve, also when no checkpoint is kept
    except Exception as error:
        if is_full_disk(error):
            raise _full_disk(Path(training_args.output_dir), trainer.model) from None
        raise
    if not args.save_final_model:
        return None
    model_dir = Path(args.model_dir or Path(training_args.output_dir) / "model")
    if trainer.accelerator.is_main_process:
        final = _merged(trainer, args)
        final.config.use_cache = True
        provenance = {
            "kind": "fine-tuned",
            "base_model": hub_reference(args.model_name_or_path),
            "tuning": args.tuning,
        }
        # the collator's calls leave the fast tokenizer truncating at max_length, which its files would keep and
        # every later padded call would warn about
        processor.tokenizer.backend_tokenizer.no_truncation()
        save_model_folder(final.eval(), processor, model_dir, provenance=provenance)
    trainer.accelerator.wait_for_everyone()
    return model_dir


@contextmanager
def labelled_positions_only():
    """TRL's fused LM head, projecting only the positions that have a label on the CPU too.

    Off Triton devices TRL (1.x) projects every position through the LM head and zeroes the unlabelled ones
    afterwards, so that a compiler such as Neuron's sees one tile shape on every batch; on a CPU running eagerly
    that is work thrown away. In SPHINX's training nearly every position is unlabelled (the visual tokens, the
    system prompt, the question): the demo's stage 2 labels about one position in eleven, and projecting the rest
    took about a quarter of its step (`benchmarks/README.md`). The loss is the same sum over the same labelled
    positions, rounded in another order. Where TRL no longer decides this through `_use_triton`, nothing changes.
    """
    import trl.trainer.utils as trl_utils

    uses_triton = getattr(trl_utils, "_use_triton", None)
    if uses_triton is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or uses_triton(device)
    try:
        yield
    finally:
        trl_utils._use_triton = uses_triton


def _full_disk(output_dir: Path, model) -> ValueError:
    """The error of a checkpoint that did not fit: its staging folder is removed (resuming finds the last
    complete checkpoint in any case)."""
    incomplete = sorted(output_dir.glob(staging_sibling(output_dir / f"{PREFIX_CHECKPOINT_DIR}-*").name))
    for staging in incomplete:
        shutil.rmtree(staging, ignore_errors=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = sum(8 * p.numel() for p in model.parameters() if p.requires_grad)  # AdamW's two float32 moments
    where = output_dir / incomplete[0].name[1 : -len(STAGING_SUFFIX)] if incomplete else output_dir
    return ValueError(
        f"{where}: the filesystem is full; a checkpoint needs about {human_size(weights + optimizer)} (the incomplete "
        "checkpoint was removed: free space and resume from the last complete one with --resume_from_checkpoint)"
    )


def _merged(trainer: SFTTrainer, args: SphinxTuningArguments):
    """The trained model as a plain SPHINX model: LoRA merged in; QLoRA merged into a 16-bit copy."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if args.tuning == "full":
        return model
    if args.tuning == "lora":
        return model.merge_and_unload()
    # QLoRA: merging into 4-bit weights would round the update away; merge into the 16-bit base instead
    adapter = Path(trainer.args.output_dir) / "adapter"
    model.save_pretrained(adapter)
    trained_boundaries = {
        name: p.detach().cpu() for name, p in model.named_parameters() if name.endswith(IMAGE_BOUNDARIES)
    }
    from peft import PeftModel

    base = load_model(args.model_name_or_path, dtype=args.dtype)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    with torch.no_grad():
        for name, parameter in merged.named_parameters():
            for trained_name, value in trained_boundaries.items():
                if trained_name.endswith(name):
                    parameter.copy_(value.to(parameter.dtype))
    return merged


def make_parser() -> TrlParser:
    return TrlParser((SphinxTuningArguments, SFTConfig))


def main(argv: list[str] | None = None) -> Path | None:
    """Parse `--config CONFIG.yaml` plus command-line overrides (paths relative to the working directory), train."""
    args, training_args = make_parser().parse_args_and_config(args=argv)
    return train(args, training_args)
