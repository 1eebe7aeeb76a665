"""Multi-task SFT: task formats and datasets, the collator's labels, and the TRL recipes end to end."""

import contextlib
import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.image_utils import make_flat_list_of_images

from modeling_sphinx.cli import main
from modeling_sphinx.folder.create import init_model
from modeling_sphinx.folder.publish import check_folder
from modeling_sphinx.processing.tasks_sphinx import (
    TASK_INSTRUCTIONS,
    format_box,
    format_boxes,
    format_grounded,
    format_keypoints,
    format_point,
    parse_grounding,
)
from modeling_sphinx.records import DataError
from modeling_sphinx.training.mixtures import build_samples, load_mixture, read_mixture
from modeling_sphinx.training.sft import SphinxDataCollator

from .helpers import IMAGES, train_args, write_jsonl

REPO = Path(__file__).resolve().parents[1]
WIDE = (100, 200)  # (height, width): padded to a 200-px square with 50 rows above the image


def _by_task(world) -> dict[str, list[dict]]:
    sources, _ = read_mixture(world / "mixture.yaml")
    return {source.task: list(build_samples(source)) for source in sources}


def _turns(sample: dict) -> list[tuple[str, str]]:
    texts = [
        next(part["text"] for part in message["content"] if part["type"] == "text") for message in sample["messages"]
    ]
    return list(zip(texts[::2], texts[1::2], strict=True))


def test_task_builders_write_the_original_instructions_and_padded_square_coordinates(world):
    samples = _by_task(world)
    # red box [20, 10, 120, 60] in a 200x100 image: x / 200, (y + 50) / 200
    rec = samples["referring_expression"][0]
    assert _turns(rec) == [
        (
            "Please provide the bounding box coordinate of the region this sentence describes: the red box.",
            "[0.10,0.30,0.60,0.55]",
        )
    ]
    assert rec["images"] == [str(world / "images" / "red.png")] and rec["id"] == "refcoco.jsonl#r1/0"
    assert rec["messages"][0]["content"][0] == {"type": "image"}
    # a COCO [x, y, w, h] box, two sentences: two samples
    blue = [s for s in samples["referring_expression"] if s["id"].startswith("refcoco.jsonl#b1")]
    assert [_turns(s)[0][1] for s in blue] == ["[0.30,0.30,0.80,0.55]"] * 2
    assert _turns(samples["region_caption"][0]) == [
        ("Please provide a short description for this region: [0.10,0.30,0.60,0.55]", "the red box")
    ]
    detections = {_turns(s)[0][0]: _turns(s)[0][1] for s in samples["detection"]}
    assert detections == {
        "Detect all person shown in the image.": "[0.10,0.30,0.60,0.55;0.00,0.25,0.20,0.45]",
        "Detect all dog shown in the image.": "[0.70,0.50,1.00,0.75]",  # the crowd annotation is skipped
    }
    assert _turns(samples["grounded_caption"][0]) == [
        (
            TASK_INSTRUCTIONS["grounded_caption"],
            "<p>person</p>[0.10,0.30,0.60,0.55;0.00,0.25,0.20,0.45], <p>dog</p>[0.70,0.50,1.00,0.75]",
        )
    ]
    assert _turns(samples["keypoints"][0]) == [
        (
            "Detect the key points of the person in the region [0.10,0.30,0.60,0.55].",
            "<p>nose</p>[0.50,0.35], <p>left shoulder</p>[0.40,0.45]",
        )
    ]
    assert _turns(samples["vqa"][0]) == [
        ("What colour is the box?\nAnswer the question using a single word or phrase.", "red")
    ]
    assert _turns(samples["text_detection"][0]) == [
        (TASK_INSTRUCTIONS["text_detection"], "<p>EXIT</p>[0.50,0.30,1.00,0.55]")
    ]
    assert _turns(samples["chart_to_table"][0])[0][0] == "Convert this chart to a table."
    assert _turns(samples["conversations"][0]) == [
        ("What is this?", "A green box."),
        ("Where is it?", "On the right."),
    ]


def test_formatting_then_parsing_is_exact():
    boxes = [[20.0, 10.0, 120.0, 60.0], [0.0, 0.0, 40.0, 40.0]]  # on the 2-decimal grid of a 200-px square
    cases = [
        (format_box(boxes[0], WIDE), boxes[:1]),
        (format_boxes(boxes, WIDE), boxes),
        (format_grounded([("a dog", boxes)], WIDE), boxes),
    ]
    for text, expected in cases:
        parsed = parse_grounding(text, WIDE)
        assert parsed.boxes == [pytest.approx(b) for b in expected]
        if "<p>" in text:
            assert format_grounded([(e.phrase, e.boxes) for e in parsed.entities], WIDE) == text
        else:
            assert format_boxes(parsed.boxes, WIDE) == text
    keypoints = [0.0] * 51
    keypoints[0:3], keypoints[48:51] = [100.0, 20.0, 2], [10.0, 90.0, 1]
    text = format_keypoints(keypoints, WIDE)
    parsed = parse_grounding(text, WIDE)
    assert [(e.phrase, e.points) for e in parsed.entities] == [
        ("nose", [pytest.approx([100.0, 20.0])]),
        ("right ankle", [pytest.approx([10.0, 90.0])]),
    ]
    assert format_point(parsed.points[0], WIDE) == "[0.50,0.35]"
    with pytest.raises(ValueError, match="51 numbers"):
        format_keypoints([1, 2, 3], WIDE)


def test_mixture_interleaves_sources_by_weight(world):
    dataset = load_mixture(world / "mixture.yaml")
    assert set(dataset.column_names) == {"messages", "images", "task", "id"}
    tasks = set(dataset["task"])
    assert tasks == {
        "vqa",
        "referring_expression",
        "region_caption",
        "detection",
        "grounded_caption",
        "keypoints",
        "text_detection",
        "chart_to_table",
        "conversations",
    }
    assert load_mixture(world / "mixture.yaml")["id"] == dataset["id"]  # seeded
    streamed = load_mixture(world / "mixture.yaml", streaming=True)
    assert {row["task"] for row in streamed} == tasks


def _mixture(tmp_path, entries):
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump({"sources": entries}))
    return path


def test_a_prompt_template_replaces_each_tasks_instruction(world, tmp_path):
    sources, _ = read_mixture(world / "mixture.yaml")
    template = {"prompt_template": "About the image: {content}"}
    prompts = {
        source.task: _turns(next(build_samples(dataclasses.replace(source, options=template))))[0][0]
        for source in sources
        if source.task != "conversations"  # a conversation's turns are its own
    }
    assert prompts["vqa"] == "About the image: What colour is the box?"
    assert prompts["referring_expression"] == "About the image: the red box"
    assert prompts["region_caption"] == "About the image: [0.10,0.30,0.60,0.55]"
    assert prompts["detection"] == "About the image: person"
    assert prompts["chart_to_table"] == "About the image: "  # a task without fields keeps only the template
    entry = {"task": "vqa", "path": str(world / "vqa.jsonl"), "options": {"prompt_template": "About {what}"}}
    with pytest.raises(
        DataError, match=r"a prompt template is a string with a \{content\} field, got 'About \{what\}'"
    ):
        read_mixture(_mixture(tmp_path, [entry]))
    entry["options"] = {"prompt_template": "{content} and {other}"}
    with pytest.raises(DataError, match=r"only \{content\} may be a field"):
        read_mixture(_mixture(tmp_path, [entry]))


def test_vqa_rows_train_from_answer_or_vqav2s_answers(world, tmp_path):
    """The columns eval reads are the columns training reads: `answer`, or VQAv2's ten annotators' `answers`
    (strings or `{"answer": ...}`), whose most given answer is the target."""
    image = str(world / "images" / "red.png")
    rows = [
        {"image": image, "question": "Colour?", "answer": "red"},
        {"image": image, "question": "Colour?", "answers": ["red", "crimson", "red"]},
        {"image": image, "question": "Colour?", "answers": [{"answer": "scarlet"}, {"answer": "scarlet"}]},
    ]
    write_jsonl(tmp_path / "vqa.jsonl", rows)
    sources, _ = read_mixture(_mixture(tmp_path, [{"task": "vqa", "path": str(tmp_path / "vqa.jsonl")}]))
    answers = [_turns(sample)[0][1] for sample in build_samples(sources[0])]
    assert answers == ["red", "red", "scarlet"]
    write_jsonl(tmp_path / "none.jsonl", [{"image": image, "question": "Colour?"}])
    sources, _ = read_mixture(_mixture(tmp_path, [{"task": "vqa", "path": str(tmp_path / "none.jsonl")}]))
    with pytest.raises(DataError, match="record 0: the record has no 'answer' .* or 'answers'"):
        list(build_samples(sources[0]))


def test_bad_data_is_named(world, tmp_path):
    missing = tmp_path / "missing.jsonl"
    write_jsonl(missing, [{"image": "nowhere.png", "question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=rf"{missing}, record 0: image file '.*nowhere.png' does not exist"):
        load_mixture(_mixture(tmp_path, [{"task": "vqa", "path": str(missing)}]))
    outside = tmp_path / "outside.jsonl"
    write_jsonl(outside, [{"image": "red.png", "expression": "x", "box": [150, 10, 260, 60]}])
    entry = {"task": "referring_expression", "path": str(outside), "image_root": str(world / "images")}
    with pytest.raises(DataError, match=r"record 0: box \[150, 10, 260, 60\] is not inside the 200x100 image"):
        load_mixture(_mixture(tmp_path, [entry]))
    with pytest.raises(DataError, match="unknown task 'segmentation'; known: conversations, vqa"):
        load_mixture(_mixture(tmp_path, [{"task": "segmentation", "path": "x.json"}]))
    bad_turns = tmp_path / "turns.json"
    bad_turns.write_text(
        json.dumps(
            [{"image": "red.png", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}]
        )
    )
    entry = {"task": "conversations", "path": str(bad_turns), "image_root": str(world / "images")}
    with pytest.raises(DataError, match=r"turns.json, record 0: the conversation must alternate 'human' and 'gpt'"):
        load_mixture(_mixture(tmp_path, [entry]))


@pytest.fixture(scope="module")
def tiny_sphinx(tiny_model_dir):
    return tiny_model_dir("sphinx")


def test_labels_supervise_exactly_the_answers(world, tiny_sphinx):
    processor = AutoProcessor.from_pretrained(tiny_sphinx)
    samples = _by_task(world)
    batch_samples = [samples["conversations"][0], samples["referring_expression"][0], samples["vqa"][1]]
    for assistant_only in (True, False):
        collator = SphinxDataCollator(processor=processor, max_length=4096, assistant_only_loss=assistant_only)
        batch = collator([dict(s) for s in batch_samples])
        labels, ids = batch["labels"], batch["input_ids"]
        assert not (labels == processor.image_token_id).any()
        assert (labels[batch["attention_mask"] == 0] == -100).all()
        if not assistant_only:
            continue
        for row, sample in enumerate(batch_samples):
            supervised = labels[row][labels[row] != -100]
            expected = "".join(f" {answer}\n###" for _, answer in _turns(sample))
            assert processor.tokenizer.decode(supervised).strip() == expected.strip()
            # the supervised ids are exactly the answers' ids as they sit in the prompt
            positions = (labels[row] != -100).nonzero().flatten()
            assert torch.equal(ids[row][positions], supervised)
    tight = SphinxDataCollator(processor=processor, max_length=200, assistant_only_loss=True)
    with pytest.raises(ValueError, match=r"sample refcoco.jsonl#r1/0: its 1 image\(s\) need 292 positions"):
        tight([dict(samples["referring_expression"][0])])


def test_image_cache_reads_each_file_once_and_changes_nothing(world, tiny_sphinx, monkeypatch):
    from modeling_sphinx.training import sft

    processor = AutoProcessor.from_pretrained(tiny_sphinx)
    samples = _by_task(world)
    batch_samples = [samples["referring_expression"][0], samples["vqa"][1], samples["vqa"][0]]
    plain = SphinxDataCollator(processor=processor, max_length=4096, assistant_only_loss=True)
    files = {str(image) for sample in batch_samples for image in sample["images"]}
    assert len(files) >= 2 and len(files) < len(batch_samples)  # an image shared by two samples of the batch
    decoded, open_image = [], sft.open_image
    monkeypatch.setattr(sft, "open_image", lambda path: decoded.append(path) or open_image(path))
    own_image_processor = processor.image_processor
    preprocessed, preprocess = [], type(own_image_processor).preprocess

    def counted(self, images, *args, **kwargs):
        preprocessed.extend(make_flat_list_of_images(images))
        return preprocess(self, images, *args, **kwargs)

    monkeypatch.setattr(type(processor.image_processor), "preprocess", counted)
    expected = plain([dict(s) for s in batch_samples])
    assert not decoded  # without a cache TRL's processor decodes the files itself
    assert len(preprocessed) == len(batch_samples)
    for size, evicts in ((len(files), False), (1, True)):
        decoded.clear()
        preprocessed.clear()
        cached = SphinxDataCollator(
            processor=processor, max_length=4096, assistant_only_loss=True, image_cache_size=size
        )
        for _ in range(3):
            batch = cached([dict(s) for s in batch_samples])
            assert batch.keys() == expected.keys()
            assert all(torch.equal(batch[key], expected[key]) for key in expected)
        assert len(cached._decoded) == size and len(cached._pixels) == size
        assert processor.image_processor is own_image_processor  # given back after each batch
        if evicts:
            assert len(decoded) > len(files) and len(preprocessed) > len(files)
        else:
            assert len(decoded) == len(files) and len(preprocessed) == len(files)
    copied = pickle.loads(pickle.dumps(cached))  # what a DataLoader worker gets
    assert not copied._decoded and not copied._pixels
    batch = copied([dict(s) for s in batch_samples])
    assert all(torch.equal(batch[key], expected[key]) for key in expected) and len(copied._pixels) == 1
    loose = [dict(s, images=[Image.open(image) for image in s["images"]]) for s in batch_samples]
    preprocessed.clear()
    for _ in range(2):  # images given as objects are the caller's, preprocessed every time
        batch = cached([dict(s) for s in loose])
        assert all(torch.equal(batch[key], expected[key]) for key in expected)
    assert len(preprocessed) == 2 * len(batch_samples)


def test_the_lm_head_projects_only_the_labelled_positions(world, tiny_sphinx, tmp_path, monkeypatch):
    """TRL's fused head on the CPU, under `labelled_positions_only` (as `train` runs it): the same loss and
    gradients, from only the positions that have a label."""
    import trl.trainer.utils as trl_utils

    from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration
    from modeling_sphinx.training.sft import labelled_positions_only, make_parser, train

    projected, apply = [], trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction,
        "apply",
        lambda hidden, *rest: projected.append(len(hidden)) or apply(hidden, *rest),
    )
    processor = AutoProcessor.from_pretrained(tiny_sphinx)
    samples = _by_task(world)
    collator = SphinxDataCollator(processor=processor, max_length=4096, assistant_only_loss=True)
    batch = collator([dict(samples["vqa"][0]), dict(samples["referring_expression"][0])])
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    torch.manual_seed(0)
    model = SphinxForConditionalGeneration(SphinxConfig.from_pretrained(tiny_sphinx))
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    results = []
    model.eval()  # no dropout (the Q-Former's), so that the two ways see the same activations
    for compact in (False, True):
        model.zero_grad()
        with labelled_positions_only() if compact else contextlib.nullcontext():
            out = model(**batch, fused_lm_head=True)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert projected == [batch["labels"][:, 1:].numel(), labelled] and labelled < projected[0] / 4
    (full, full_grads), (compact, compact_grads) = results
    for name in ("loss", "log_probs", "entropy", "is_top1"):
        assert torch.allclose(getattr(compact, name), getattr(full, name), rtol=1e-5, atol=1e-6), name
    assert all(torch.allclose(c, f, rtol=1e-4, atol=1e-6) for c, f in zip(compact_grads, full_grads, strict=True))
    assert trl_utils._use_triton(torch.device("cpu")) is False  # restored

    collated, collate = [], SphinxDataCollator.torch_call
    monkeypatch.setattr(
        SphinxDataCollator, "torch_call", lambda self, rows: collated.append(collate(self, rows)) or collated[-1]
    )
    projected.clear()
    argv = train_args(tiny_sphinx, world, tmp_path / "run", "--max_steps", "2", "--save_final_model", "false")[1:]
    args, training_args = make_parser().parse_args_and_config(args=["--config", *argv])
    train(args, training_args, model=model, processor=processor)
    labelled_per_batch = [int((b["labels"][:, 1:] != -100).sum()) for b in collated]
    assert len(projected) == 2 and projected == labelled_per_batch[:2]  # the loader collates one batch ahead


def _losses(out: Path) -> list[float]:
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_smoke_preset_trains_saves_resumes_and_reloads(world, tiny_sphinx, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_sphinx, world, out)) == 0
    assert "trained model saved to" in capsys.readouterr().out
    losses = _losses(out)
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-4", "checkpoint-8"}
    model = AutoModelForImageTextToText.from_pretrained(out / "model").eval()
    processor = AutoProcessor.from_pretrained(out / "model")
    assert (out / "model" / "modeling_sphinx.py").is_file() and (out / "model" / "README.md").is_file()
    assert check_folder(out / "model")  # what `sphinx-mllm push` uploads
    inputs = processor(
        text="<image>What colour is the box?", images=Image.open(world / "images" / "red.png"), return_tensors="pt"
    )
    assert model.generate(**inputs, max_new_tokens=3).shape[1] == inputs["input_ids"].shape[1] + 3

    resumed = tmp_path / "resumed"
    (resumed).mkdir()
    os.symlink(out / "checkpoint-4", resumed / "checkpoint-4")
    args = train_args(tiny_sphinx, world, resumed, "--resume_from_checkpoint", str(resumed / "checkpoint-4"))
    assert main(args) == 0
    state = json.loads((resumed / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    assert [e["loss"] for e in state["log_history"] if "loss" in e][4:] == pytest.approx(losses[4:], rel=1e-4)


def test_a_model_object_is_tuned_in_place_with_callbacks_and_no_final_folder(world, tiny_sphinx, tmp_path):
    """The seams `benchmarks/gpu_suite.py` uses: a model built from a config (not loaded from a folder), the
    processor, a callback, and `save_final_model: false` for a run that only measures."""
    from transformers import TrainerCallback

    from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration
    from modeling_sphinx.training.sft import make_parser, train

    class Steps(TrainerCallback):
        seen = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(state.global_step)

    config = SphinxConfig.from_pretrained(tiny_sphinx)
    model = SphinxForConditionalGeneration(config)
    before = model.lm_head.weight.detach().clone()
    out = tmp_path / "run"
    argv = train_args(tiny_sphinx, world, out, "--max_steps", "3", "--save_final_model", "false")[1:]
    args, training_args = make_parser().parse_args_and_config(args=["--config", *argv])
    processor = AutoProcessor.from_pretrained(tiny_sphinx)
    assert train(args, training_args, model=model, processor=processor, callbacks=[Steps()]) is None
    assert Steps.seen == [1, 2, 3] and not torch.equal(model.lm_head.weight, before)
    assert (out / "trainer_state.json").is_file() and not (out / "model").exists()


def test_kept_encoder_features_train_as_encoding_every_step(world, tiny_sphinx, tmp_path):
    from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration
    from modeling_sphinx.training.sft import make_parser, train

    losses, encoded = {}, {}
    for size in (0, 8):
        torch.manual_seed(0)
        model = SphinxForConditionalGeneration(SphinxConfig.from_pretrained(tiny_sphinx))
        encoded[size] = []
        model.model.clip.patch_embed.register_forward_hook(
            lambda module, args, output, seen=encoded[size]: seen.append(1)
        )
        out = tmp_path / f"kept-{size}"
        extra = ("--max_steps", "4", "--save_final_model", "false", "--feature_cache_size", str(size))
        args, training_args = make_parser().parse_args_and_config(
            args=["--config", *train_args(tiny_sphinx, world, out, *extra)[1:]]
        )
        train(args, training_args, model=model, processor=AutoProcessor.from_pretrained(tiny_sphinx))
        state = json.loads((out / "trainer_state.json").read_text())
        losses[size] = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses[8] == pytest.approx(losses[0], rel=1e-5)
    assert len(encoded[0]) == 4 and len(encoded[8]) < 4  # a step whose images are all kept runs no encoder


def test_kept_encoder_features_are_refused_with_fsdp(world, tiny_sphinx, tmp_path, capsys):
    args = train_args(tiny_sphinx, world, tmp_path / "x", "--feature_cache_size", "8", "--fsdp", "full_shard")
    assert main(args) == 2
    assert "feature_cache_size needs every rank to run the encoders" in capsys.readouterr().err


def test_lora_trains_only_the_named_modules_and_merges_back(world, tiny_sphinx, tmp_path):
    out = tmp_path / "lora"
    assert main(train_args(tiny_sphinx, world, out, "--tuning", "lora", "--learning_rate", "5e-3")) == 0
    from peft import PeftModel
    from safetensors.torch import load_file

    checkpoint = out / "checkpoint-8"
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert {k.split(".lora_")[0].split(".")[-1] for k in adapter if ".lora_" in k} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert all("language_model.layers" in k for k in adapter if ".lora_" in k)
    saved_projectors = {k for k in adapter if ".lora_" not in k}
    assert saved_projectors and all("visual_proj" in k or "qformer_proj" in k for k in saved_projectors)

    base = AutoModelForImageTextToText.from_pretrained(tiny_sphinx)
    merged = AutoModelForImageTextToText.from_pretrained(out / "model").eval()
    boundaries = load_file(checkpoint / "image_boundaries.safetensors")
    assert not torch.equal(boundaries["model.start_img"], base.model.start_img)  # trained
    assert torch.equal(merged.model.start_img, boundaries["model.start_img"])
    peft_model = PeftModel.from_pretrained(base, checkpoint).eval()
    with torch.no_grad():
        peft_model.base_model.model.model.start_img.copy_(boundaries["model.start_img"])
        peft_model.base_model.model.model.end_img.copy_(boundaries["model.end_img"])
    processor = AutoProcessor.from_pretrained(tiny_sphinx)
    inputs = processor(
        text="<image>Where is the box?", images=Image.open(world / "images" / "blue.png"), return_tensors="pt"
    )
    with torch.no_grad():
        assert torch.allclose(peft_model(**inputs).logits, merged(**inputs).logits, atol=1e-5)
    original = AutoModelForImageTextToText.from_pretrained(tiny_sphinx).state_dict()
    for name, tensor in merged.state_dict().items():
        if name.startswith(("model.clip.", "model.convnext.", "model.dinov2.", "model.qformer.")):
            assert torch.equal(tensor, original[name]), name  # the towers are never trained


@pytest.mark.slow
def test_two_process_run_on_cpu(world, tiny_sphinx, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--cpu",
        str(REPO / "recipes" / "sft" / "sft_sphinx.py"),
        "--config",
        str(REPO / "recipes" / "sft" / "smoke.yaml"),
        "--model_name_or_path",
        str(tiny_sphinx),
        "--mixture",
        str(world / "mixture.yaml"),
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--save_steps",
        "4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert AutoModelForImageTextToText.from_pretrained(out / "model") is not None


def test_a_diverged_model_is_never_written(world, tiny_sphinx, tmp_path):
    """Weights that became NaN in training end in an error naming a tensor, with no final folder to chat with or
    push."""
    from transformers import TrainerCallback

    from modeling_sphinx.training.sft import make_parser, train

    class Diverge(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")

    out = tmp_path / "run"
    argv = train_args(tiny_sphinx, world, out, "--max_steps", "1", "--save_steps", "10")[1:]
    args, training_args = make_parser().parse_args_and_config(args=["--config", *argv])
    with pytest.raises(ValueError, match=r"tensor lm_head.weight has 1 of \d+ values NaN or infinite; .* not written"):
        train(args, training_args, callbacks=[Diverge()])
    assert not (out / "model").exists() and not list(out.glob(".model.*partial"))


def test_unknown_config_and_too_short_max_length(world, tiny_sphinx, tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "training config" in capsys.readouterr().err
    args = train_args(tiny_sphinx, world, tmp_path / "x", "--max_length", "100")
    assert main(args) == 2
    assert "max_length 100 cannot hold one image" in capsys.readouterr().err
    assert not (tmp_path / "x" / "model").exists()


def test_the_smoke_preset_before_init_explains_the_missing_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/tiny here: the preset's model_name_or_path
    assert main(["train", str(REPO / "recipes" / "sft" / "smoke.yaml")]) == 2
    err = capsys.readouterr().err
    assert "'runs/tiny' is neither a local folder nor a Hub model that loads" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_documented_launch_commands_name_files_that_exist():
    """The script's docstring and the recipes' README launch files of this repository and TRL's accelerate
    configs."""
    import trl

    docstring = (REPO / "recipes" / "sft" / "sft_sphinx.py").read_text().split('"""')[1]
    recipes_readme = (REPO / "recipes" / "README.md").read_text()
    named = re.findall(r"(recipes/[\w/.-]+\.(?:yaml|py))", docstring + recipes_readme)
    assert len(named) >= 6 and all((REPO / path).is_file() for path in named), named
    shipped = re.findall(r"\$TRL_CONFIGS/([\w.-]+\.yaml)", recipes_readme)
    configs = Path(trl.__file__).parent / "accelerate_configs"
    assert shipped and all((configs / name).is_file() for name in shipped), shipped


def test_qlora_trains_with_the_towers_in_16_bit(world, tiny_sphinx, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the quant extra (pip install -e '.[quant]')")
    import bitsandbytes as bnb

    from modeling_sphinx.training.sft import SphinxTuningArguments, load_model_to_tune

    with pytest.raises(ValueError, match="QLoRA trains in bfloat16"):
        SphinxTuningArguments(model_name_or_path=str(tiny_sphinx), mixture="unused", tuning="qlora", dtype="float32")
    args = SphinxTuningArguments(model_name_or_path=str(tiny_sphinx), mixture="unused", tuning="qlora")
    model = load_model_to_tune(args)
    four_bit = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert four_bit and all(".language_model.layers." in name for name in four_bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.visual_proj.modules())
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    out = tmp_path / "qlora"
    # TRL casts the trainable parameters of a quantized model to bfloat16, so QLoRA computes in bfloat16
    extra = (
        "--tuning",
        "qlora",
        "--dtype",
        "bfloat16",
        "--learning_rate",
        "5e-3",
        "--max_steps",
        "4",
        "--save_steps",
        "4",
    )
    assert main(train_args(tiny_sphinx, world, out, *extra)) == 0
    merged = AutoModelForImageTextToText.from_pretrained(out / "model")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())  # merged into a 16-bit copy
    base = AutoModelForImageTextToText.from_pretrained(tiny_sphinx, dtype=torch.bfloat16).state_dict()
    merged_state = merged.state_dict()
    assert merged_state["model.language_model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    changed = {n for n, t in merged_state.items() if not torch.equal(t, base[n])}
    assert any(".language_model.layers." in n and n.endswith("q_proj.weight") for n in changed), "LoRA merged in"
    assert not any(
        n.startswith(("model.clip.", "model.dinov2.", "model.convnext.", "model.qformer.")) for n in changed
    )


def test_chat_in_4_bit_answers_on_cpu(tiny_sphinx, capsys, monkeypatch):
    pytest.importorskip("bitsandbytes", reason="--load-in-4bit needs the quant extra (pip install -e '.[quant]')")
    import bitsandbytes as bnb
    from transformers import AutoModelForImageTextToText as Auto

    loaded = []
    original = Auto.from_pretrained

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded.append(model)
        return model

    monkeypatch.setattr(Auto, "from_pretrained", spy)
    image = str(IMAGES / "astronaut.png")
    code = main(
        ["chat", str(tiny_sphinx), "--image", image, "--prompt", "Hi", "--max-new-tokens", "3", "--load-in-4bit"]
    )
    assert code == 0 and capsys.readouterr().out.strip()
    model = loaded[0]
    linears = [
        m for n, m in model.named_modules() if ".language_model.layers." in n and isinstance(m, torch.nn.Linear)
    ]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.clip.modules())


@pytest.mark.parametrize("variant", ["sphinx-1k", "sphinx-tiny-1k", "sphinx-moe"])
def test_trl_fsdp_configs_resolve_their_wrap_policy(variant):
    import trl
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration

    model = SphinxForConditionalGeneration(SphinxConfig.from_variant(variant, tiny=True))
    blocks = {name: sum(type(m).__name__ == name for m in model.modules()) for name in model._no_split_modules}
    assert all(count > 0 for count in blocks.values()), blocks  # only classes the variant has
    configs = Path(trl.__file__).parent / "accelerate_configs"
    for name in ("fsdp1", "fsdp2"):
        fsdp = yaml.safe_load((configs / f"{name}.yaml").read_text())["fsdp_config"]
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower()
        )
        if plugin.fsdp_version == 2:
            policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
            wrapped = sum(policy(module) for module in model.modules())
        else:
            plugin.set_auto_wrap_policy(model)
            wrapped = sum(
                plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0) for m in model.modules()
            )
        assert wrapped == sum(blocks.values()), name
    for name in ("multi_gpu", "zero3"):
        assert yaml.safe_load((configs / f"{name}.yaml").read_text())["distributed_type"] in ("MULTI_GPU", "DEEPSPEED")


def test_a_failed_final_save_leaves_nothing_behind(world, tiny_sphinx, tmp_path, monkeypatch, capsys):
    import modeling_sphinx.folder.card

    def broken_card(*args, **kwargs):
        raise ValueError("disk full while writing the card")

    monkeypatch.setattr(modeling_sphinx.folder.card, "write_model_card", broken_card)
    out = tmp_path / "run"
    assert main(train_args(tiny_sphinx, world, out, "--max_steps", "2", "--save_steps", "2")) == 2
    assert "disk full while writing the card" in capsys.readouterr().err
    assert (out / "checkpoint-2").is_dir()  # the training itself is kept
    assert not (out / "model").exists() and not list(out.glob(".model.*partial"))


def test_moe_load_balancing_loss_trains(world, tmp_path):
    folder = init_model("sphinx-moe", tmp_path / "moe", tiny=True, text_config={"router_aux_loss_coef": 0.02})
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text="<image>Hi there", images=Image.open(world / "images" / "red.png"), return_tensors="pt")
    out = model(**inputs, labels=inputs["input_ids"], output_router_logits=True)
    assert out.aux_loss is not None and len(out.router_logits) == model.config.text_config.num_hidden_layers
    plain = model(**inputs, labels=inputs["input_ids"])
    assert torch.allclose(out.loss, plain.loss + 0.02 * out.aux_loss)
    run = tmp_path / "run"
    assert (
        main(train_args(folder, world, run, "--max_steps", "2", "--save_steps", "2")) == 0
    )  # TRL asks for router logits


def test_whole_projectors_as_peft_modules_to_save(tiny_sphinx, world):
    from peft import LoraConfig, get_peft_model

    from modeling_sphinx.training.sft import LLM_LINEAR_LAYERS

    model = AutoModelForImageTextToText.from_pretrained(tiny_sphinx)
    config = LoraConfig(target_modules=LLM_LINEAR_LAYERS, modules_to_save=["visual_proj", "qformer_proj"])
    peft_model = get_peft_model(model, config)
    processor = AutoProcessor.from_pretrained(tiny_sphinx)
    inputs = processor(text="<image>Hi", images=Image.open(world / "images" / "red.png"), return_tensors="pt")
    loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert any("visual_proj.modules_to_save" in n for n in trained) and any("lora_" in n for n in trained)


def test_the_tuning_arguments_are_trl_model_config_with_sphinx_defaults(tiny_sphinx):
    from trl import ModelConfig

    from modeling_sphinx.training import LLM_LINEAR_LAYERS, SphinxTuningArguments, lora_config

    assert issubclass(SphinxTuningArguments, ModelConfig)
    plain = SphinxTuningArguments(model_name_or_path=str(tiny_sphinx), mixture="m.yaml")
    assert (plain.tuning, plain.use_peft, plain.dtype, plain.use_bnb_nested_quant) == ("full", False, "bfloat16", True)
    trl_spelling = SphinxTuningArguments(model_name_or_path="m", mixture="m.yaml", use_peft=True, load_in_4bit=True)
    assert trl_spelling.tuning == "qlora"
    sphinx_spelling = SphinxTuningArguments(model_name_or_path="m", mixture="m.yaml", tuning="lora")
    assert sphinx_spelling.use_peft and not sphinx_spelling.load_in_4bit
    with pytest.raises(ValueError, match="tuning: full contradicts use_peft: True"):
        SphinxTuningArguments(model_name_or_path="m", mixture="m.yaml", tuning="full", use_peft=True)
    with pytest.raises(ValueError, match="mixture is required"):
        SphinxTuningArguments(model_name_or_path="m")
    with pytest.raises(ValueError, match="8-bit loading is not a tuning mode"):
        SphinxTuningArguments(model_name_or_path="m", mixture="m.yaml", load_in_8bit=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_sphinx)
    args = SphinxTuningArguments(model_name_or_path="m", mixture="m.yaml", tuning="lora", use_rslora=True, lora_r=4)
    config = lora_config(args, model)
    assert config.use_rslora and config.r == 4 and config.target_modules == LLM_LINEAR_LAYERS
    assert set(config.modules_to_save) == {"visual_proj.0", "visual_proj.1", "qformer_proj.0", "qformer_proj.1"}
    assert lora_config(plain, model) is None
