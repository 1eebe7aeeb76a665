"""SPHINX's recipe in miniature, stage by stage: what the main job (`demo`) and the ablations (`ablations`) share.

- `Budget`: everything a run spends (images, steps, batch, learning rates), `FULL_BUDGET` and `QUICK_BUDGET`, and
  `claim`, which refuses a run folder made with another budget or seed;
- the data: `write_split` (a domain's images and task files), `data_splits`, `mixture_file`;
- the stages: `init_from_parts`, `caption_stage` (stage 1), `weight_mix`, `task_stage` (stage 2), `recipe_line`
  (SPHINX's line of models up to the mix: real-like captions, the copy continued on synthetic ones, the mix),
  `stage_two`;
- scoring: `score` (held-out questions, per cell), `by_question_type` (VQA split by what it asks), `summarise`
  (scores with 95 % intervals), `compare` (a paired difference), and the words both reports use
  (`format_table`, `verdict`).

Every stage writes its folder atomically and is reused when finished; a training stage's `stage.json` names the
model it started from.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..processing.tasks_sphinx import TASK_INSTRUCTIONS
from .pretrain import ENCODERS
from .world import DOMAINS, SHAPES, caption, render


@dataclass(frozen=True)
class Budget:
    """Sizes, steps and learning rates of one demo run; every arm of the ablations gets the same."""

    train_images: int  # per domain
    eval_images: int  # per domain: 2 VQA questions (a shape's colour, the dot's) and 1 grounding question each
    caption_steps: int  # stage 1, each leg: the real-like captions, then the synthetic continuation
    task_steps: int  # stage 2
    beta: float = 0.5
    batch_size: int = 16
    caption_learning_rate: float = 2e-3
    task_learning_rate: float = 2e-3


# How these numbers were chosen, with the runs behind them, is in docs/miniature.md.
FULL_BUDGET = Budget(train_images=800, eval_images=200, caption_steps=150, task_steps=1200)
QUICK_BUDGET = Budget(train_images=64, eval_images=8, caption_steps=12, task_steps=16)


def write_split(root: Path, domain: str, first_seed: int, count: int) -> Path:
    """Images plus the task files the SFT builders and `evaluate` read; returns the split's folder."""
    folder = root / f"{domain}-{first_seed}"
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    vqa, grounding, captions, detections = [], [], [], []
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": k} for i, k in enumerate(SHAPES)]}
    for seed in range(first_seed, first_seed + count):
        image, shapes, dot = render(seed, domain)
        name = f"images/{seed}.png"  # relative to the split folder, for the SFT builders and `evaluate` alike
        image.save(folder / name)
        target = shapes[seed % len(shapes)]
        vqa.append(
            {
                "id": f"{seed}-shape",
                "image": name,
                "question": f"What colour is the {target['kind']}?",
                "answer": target["colour"],
                "kind": "shape colour",
            }
        )
        vqa.append(  # the dot is seen at full size by the sub-image views only (`world.DOT`)
            {
                "id": f"{seed}-dot",
                "image": name,
                "question": "What colour is the small dot?",
                "answer": dot["colour"],
                "kind": "dot colour",
            }
        )
        grounding.append(
            {
                "id": f"{seed}",
                "image": name,
                "expression": f"the {target['colour']} {target['kind']}",
                "box": target["box"],
            }
        )
        turns = [
            {"from": "human", "value": TASK_INSTRUCTIONS["short_caption"]},
            {"from": "gpt", "value": caption(shapes, dot, domain)},
        ]
        captions.append({"id": f"{seed}", "image": name, "conversations": turns})
        coco["images"].append({"id": seed, "file_name": name, "width": image.width, "height": image.height})
        for shape in shapes:
            detections.append(
                {"id": f"{seed}-{shape['kind']}", "image": name, "category": shape["kind"], "boxes": [shape["box"]]}
            )
            x1, y1, x2, y2 = shape["box"]
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]),
                    "image_id": seed,
                    "iscrowd": 0,
                    "category_id": SHAPES.index(shape["kind"]),
                    "area": (x2 - x1) * (y2 - y1),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                }
            )
    files = {"vqa.jsonl": vqa, "grounding.jsonl": grounding, "captions.jsonl": captions, "detection.jsonl": detections}
    for name, rows in files.items():
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "detection.json").write_text(json.dumps(coco))
    (folder / "done").write_text("")
    return folder


# Stage 1 reads captions only; stage 2 samples its tasks with these weights, grounding most (it learns slowest).
CAPTION_WEIGHTS = {"conversations": 1}
TASK_WEIGHTS = {"vqa": 2, "referring_expression": 4, "region_caption": 1, "detection": 1}
TASK_FILES = {
    "conversations": "captions.jsonl",
    "vqa": "vqa.jsonl",
    "referring_expression": "grounding.jsonl",
    "region_caption": "grounding.jsonl",
    "detection": "detection.json",
}


def mixture_file(path: Path, splits: list[Path], weights: dict[str, int], prompt_template: str | None = None) -> Path:
    """A task-mixture YAML at `path` over the splits' task files, each task sampled with its weight (and every
    instruction replaced by `prompt_template` when given)."""
    import yaml

    options = {"options": {"prompt_template": prompt_template}} if prompt_template is not None else {}
    sources = [
        {"task": task, "path": str(split / TASK_FILES[task]), "image_root": str(split), "weight": weight, **options}
        for split in splits
        for task, weight in weights.items()
    ]
    path.write_text(yaml.safe_dump({"seed": 0, "sources": sources}))
    return path


def _train(model: Path, mixture: Path, out: Path, steps: int, learning_rate: float, budget: Budget, stage: str):
    from trl import SFTConfig

    from ..training.sft import SphinxTuningArguments, train

    if (out / "model" / "config.json").is_file():
        return out / "model"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # which model the stage started from, relative to the run folder: the line of models, readable afterwards
    start = {"start": os.path.relpath(model, out.parent), "mixture": mixture.name, "steps": steps}
    (out / "stage.json").write_text(json.dumps(start, indent=2) + "\n")
    args = SphinxTuningArguments(
        model_name_or_path=str(model),
        mixture=str(mixture),
        dtype="float32",
        image_cache_size=len(DOMAINS) * budget.train_images,  # every training image, decoded once
        feature_cache_size=len(DOMAINS) * budget.train_images,  # and encoded once
    )
    config = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(30, steps // 5),
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        assistant_only_loss=True,
        max_length=1024,
        logging_steps=max(1, steps // 8),
        save_strategy="no",
        report_to=[],
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    return train(args, config, progress=stage)


def init_from_parts(out: Path, seed: int, encoders: tuple[str, ...] = ENCODERS, **overrides) -> Path:
    """The miniature (with `overrides` of `world.MINIATURE`) with the package's pretrained parts (its `encoders`
    and the LLM); the projector and the start/end embeddings keep their random initialisation from `seed`, for
    stage 1 to train."""
    from ..folder.create import save_model_folder
    from ..inference import load_pretrained
    from .pretrain import init_miniature, load_parts

    if (out / "config.json").is_file():
        return out
    with tempfile.TemporaryDirectory() as scratch:
        random_init = init_miniature(Path(scratch) / "random", seed, encoders, **overrides)
        processor, model = load_pretrained(str(random_init), dtype="float32")
    load_parts(model)
    return save_model_folder(model, processor, out, provenance={"kind": "pretrained parts"})


def caption_stage(model: Path, split: Path, out: Path, budget: Budget, stage: str) -> Path:
    """One leg of stage 1: the LLM and projector trained on one domain's captions from `model`, the encoders
    frozen."""
    mixture = mixture_file(out.parent / f"{out.name}.yaml", [split], CAPTION_WEIGHTS)
    return _train(model, mixture, out, budget.caption_steps, budget.caption_learning_rate, budget, stage)


# What stage 1 trains, and so what the mix mixes: the LLM, the projector and the image start/end embeddings (the
# frozen encoders are the same in both). SPHINX's default (`mixing.DEFAULT_MIXED`) mixes the LLM alone and takes
# the rest from the base model; with the continuation's projector left out, beta = 0 would not be the
# synthetic model itself.
STAGE_ONE_TENSORS = [r"^model\.language_model\.", r"^lm_head\.", r"^model\.visual_proj\.", r"^model\.(start|end)_img$"]


def weight_mix(real: Path, synthetic: Path, beta: float, out: Path) -> Path:
    """The paper's weight mix through `sphinx-mllm mix`: beta * real + (1 - beta) * synthetic, over what stage 1
    trained."""
    import yaml

    from ..mixing import mix

    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / f"{out.name}.yaml"
    models = [{"model": str(real), "parameters": {"weight": beta}}]
    models.append({"model": str(synthetic), "parameters": {"weight": 1 - beta}})
    written = {"merge_method": "linear", "base_model": str(real), "mixed_tensors": STAGE_ONE_TENSORS, "models": models}
    recipe.write_text(yaml.safe_dump(written))
    return mix(recipe, out)


def task_stage(
    model: Path,
    splits: list[Path],
    out: Path,
    budget: Budget,
    stage: str,
    weights: dict[str, int] = TASK_WEIGHTS,
    steps: int | None = None,
    prompt_template: str | None = None,
) -> Path:
    """Stage 2: multi-task instruction tuning on `splits` for `steps` (the budget's by default), each task with
    its own instruction (or all with `prompt_template`)."""
    mixture = mixture_file(out.parent / f"{out.name}.yaml", splits, weights, prompt_template)
    steps = budget.task_steps if steps is None else steps
    return _train(model, mixture, out, steps, budget.task_learning_rate, budget, stage)


# (eval task, file, longest answer in tokens): a box is about 20 tokens of the miniature's tokenizer
EVALUATIONS = {"VQA": ("vqa", "vqa.jsonl", 8), "grounding": ("rec", "grounding.jsonl", 32)}
# the ablations score every task stage 2 trains: a region's words, and a category's boxes (one per image here)
EVERY_TASK = {
    **EVALUATIONS,
    "region-caption": ("region_caption", "grounding.jsonl", 8),
    "detection": ("detection", "detection.jsonl", 48),
}


def score(
    model_dir: Path,
    splits: dict[str, Path],
    out: Path,
    stage: str,
    evaluations: dict[str, tuple[str, str, int]] = EVALUATIONS,
    prompt_template: str | None = None,
) -> dict[str, list[float]]:
    """Per-question outcomes (1 right, 0 wrong; a box is right at IoU >= 0.5) of every task on every domain's
    held-out split, in question order: `{"VQA real": [...], "grounding real": [...], ...}`."""
    from tqdm.auto import tqdm

    from ..evaluation.runner import evaluate
    from ..inference import load_pretrained

    cells = [(name, domain) for domain in splits for name in evaluations]
    total = sum(_questions(splits[domain] / evaluations[name][1]) for name, domain in cells)
    outcomes, processor, model = {}, None, None
    with tqdm(total=total, desc=stage, dynamic_ncols=True) as bar:
        for name, domain in cells:
            task, data, longest = evaluations[name]
            folder = out / f"{domain}-{task}"
            if not (folder / "metrics.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                if model is None:
                    processor, model = load_pretrained(str(model_dir), dtype="float32")
                    # every image is asked several questions: encoded once (one grounding question per image)
                    model.keep_frozen_features(sum(_questions(split / "grounding.jsonl") for split in splits.values()))
                evaluate(
                    model,
                    processor,
                    task,
                    splits[domain] / data,
                    folder,
                    # a batch generates until its longest answer ends; at this size the generation loop's
                    # overhead, not the model, bounds it, so large batches go fastest (same answers at 32)
                    batch_size=128,
                    max_new_tokens=longest,
                    progress=False,
                    prompt_template=prompt_template,
                )
            records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
            # a grounding record's score is its IoU (0 for an answer without a box); a hit is IoU >= 0.5
            hits = [float(r["score"] >= 0.5) if task == "rec" else float(r["score"]) for r in records]
            outcomes[f"{name} {domain}"] = hits
            bar.update(len(records))
    return outcomes


def by_question_type(outcomes: dict[str, list[float]], splits: dict[str, Path]) -> dict[str, list[float]]:
    """`outcomes` with each domain's VQA cell split by what its questions ask ("shape colour real", "dot colour
    real", from the `kind` of each row of `vqa.jsonl`); the other cells as they are."""
    split_up = {}
    for cell, hits in outcomes.items():
        name, _, domain = cell.rpartition(" ")
        if name != "VQA":
            split_up[cell] = hits
            continue
        kinds = [json.loads(line)["kind"] for line in (splits[domain] / "vqa.jsonl").read_text().splitlines()]
        for kind in dict.fromkeys(kinds):
            split_up[f"{kind} {domain}"] = [hit for hit, of in zip(hits, kinds, strict=True) if of == kind]
    return split_up


def _questions(path: Path) -> int:
    return len(path.read_text().splitlines())


def summarise(outcomes: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Each cell's score with its 95 % Wilson interval, and the average of the cells with its normal interval."""
    from ..evaluation.metrics import proportion_interval

    summary, variance = {}, 0.0
    for cell, hits in outcomes.items():
        share = sum(hits) / len(hits)
        low, high = proportion_interval(round(sum(hits)), len(hits))
        summary[cell] = {"score": share, "low": low, "high": high, "questions": len(hits)}
        variance += share * (1 - share) / len(hits)
    average = sum(cell["score"] for cell in summary.values()) / len(summary)
    half = 1.96 * variance**0.5 / len(summary)
    summary["average"] = {"score": average, "low": average - half, "high": average + half}
    return summary


def compare(first: dict[str, list[float]], second: dict[str, list[float]]) -> dict[str, float]:
    """`first - second` on the average of the cells, paired over the same questions, with its 95 % interval."""
    from ..evaluation.metrics import paired_difference

    differences = [paired_difference(first[cell], second[cell]) for cell in first]
    mean = sum(d for d, _ in differences) / len(differences)
    half = 1.96 * sum(v for _, v in differences) ** 0.5 / len(differences)
    return {"difference": mean, "low": mean - half, "high": mean + half}


@contextmanager
def only_stage_progress():
    """No progress bars but the stages' own while the demo runs: loading, saving and dataset preparation are
    quick and would bury the stages' bars and the tables."""
    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_was_on, datasets_was_on = not are_progress_bars_disabled(), datasets.is_progress_bar_enabled()
    transformers_was_on = transformers_logging.is_progress_bar_enabled()
    disable_progress_bars()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub_was_on:
            enable_progress_bars()
        if datasets_was_on:
            datasets.enable_progress_bars()
        if transformers_was_on:
            transformers_logging.enable_progress_bar()


def claim(out: Path, budget: Budget, seed: int, force: bool):
    """Make `out` the folder of a run with this budget and seed (emptied first with `force`): a re-run reuses the
    finished stages, which only a run of the same budget and seed may do."""
    if force:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp, wanted = out / "budget.json", {"seed": seed, **asdict(budget)}
    if stamp.is_file() and (found := json.loads(stamp.read_text())) != wanted:
        differences = ", ".join(f"{k} {found.get(k)} (now {v})" for k, v in wanted.items() if found.get(k) != v)
        raise ValueError(
            f"{out} holds the stages of a run with {differences}; pass --force to redo them there, "
            "or choose another --out"
        )
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")


def data_splits(out: Path, budget: Budget, seed: int, held_out: int, first_held_out: int) -> tuple[dict, dict]:
    """Each domain's training split and `held_out` images from `first_held_out` on, both made from `seed`."""
    data = out / "data"
    train = {d: write_split(data, d, 1000 * (seed + 1), budget.train_images) for d in DOMAINS}
    return train, {d: write_split(data, d, first_held_out + 1000 * seed, held_out) for d in DOMAINS}


def mix_name(beta: float) -> str:
    return f"mix beta={beta:g}"


def recipe_line(
    root: Path, train: dict[str, Path], budget: Budget, seed: int, encoders=ENCODERS, label: str = "", **overrides
) -> dict[str, Path]:
    """SPHINX's line of models up to the weight mix, by name: the pretrained parts (`init`); stage 1 on the
    real-like captions (`real`); a copy of it continued on the synthetic captions (`synthetic`); their mix at the
    budget's beta."""
    init = init_from_parts(root / "init", seed, encoders, **overrides)
    real = caption_stage(init, train["real"], root / "stage1-real", budget, f"stage 1{label}, real-like captions")
    synthetic = caption_stage(
        real, train["synthetic"], root / "stage1-synthetic", budget, f"stage 1{label}, continued on synthetic"
    )
    mixed = weight_mix(real, synthetic, budget.beta, root / mix_folder(budget.beta))
    return {"init": init, "real": real, "synthetic": synthetic, mix_name(budget.beta): mixed}


def mix_folder(beta: float) -> str:
    return f"mix-beta={beta:g}"


def stage_two(root: Path, start: str, folder: Path, train: dict[str, Path], budget: Budget, label: str = "") -> Path:
    """Stage 2 from the start named `start` into `root/stage2-<start>`."""
    out = root / f"stage2-{start.replace(' ', '-')}"
    return task_stage(folder, list(train.values()), out, budget, f"stage 2{label} from {start}")


def format_table(models: dict[str, dict], best: str | None = None) -> list[str]:
    """A markdown table: a row per model, its score and 95 % interval per cell, then the question counts."""
    columns = list(next(iter(models.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, cells in models.items():
        shown = [f"{c['score']:.2f} ({c['low']:.2f}-{c['high']:.2f})" for c in cells.values()]
        lines.append(f"| {name}{' (best)' if name == best else ''} | " + " | ".join(shown) + " |")
    questions = sorted({c["questions"] for cells in models.values() for n, c in cells.items() if n != "average"})
    lines.append(
        f"(95 % intervals; {' to '.join(map(str, dict.fromkeys(questions[:1] + questions[-1:])))} "
        "held-out questions per cell)"
    )
    return lines


def verdict(found: dict[str, float], holds: str, fails: str) -> str:
    """`found` (a difference with its interval) in words: what holds, what fails, or that nothing is resolved."""
    if found["low"] > 0:
        return holds
    if found["high"] < 0:
        return fails
    return "no difference is resolved at this size"
