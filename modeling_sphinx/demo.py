"""`sphinx-mllm demo`: SPHINX's recipe in miniature, end to end, offline, on a CPU.

A generated world of coloured shapes in two visual domains, "real-like" (textured, noisy, lit, cluttered) and
"synthetic" (flat and clean), each image with a small dot that only the sub-image views see at full size, goes
through the package's public pieces as the paper's recipe:

1. `init`: a tiny SPHINX with a global view and 2 x 2 sub-image views (224-px input, 112-px views cut into
   28-px patches, no Q-Former: 5 x 19 = 95 visual tokens) assembled from the package's pretrained miniature
   parts (`sphinx-mllm demo pretrain`: encoders pretrained contrastively or self-supervised, frozen; a LLaMA
   pretrained on text), with a random projector and start/end embeddings. Against random weights, the same
   recipe's tuned mix went from 0.46 to 0.64 on average, grounding from 0.30 / 0.40 to 0.62 / 0.65.
   The patches are twice SPHINX's 14 px because the LLM's pass over the visual tokens is the cost of a step:
   with 14-px patches (335 tokens) the same 10 minutes allowed a third of the steps, and grounding stayed at
   chance (Acc@0.5 0.02 after 380 steps, against 0.19 after 1000 steps with 28-px patches);
2. stage 1, `train`: a shared base on both domains (so that both domain LLMs start from one model, as both of
   SPHINX's start from one LLaMA-2), then one model per domain tuned from that base, on VQA (colour of a shape, colour of
   the dot) and referring-expression grounding, three grounding samples to one VQA sample (grounding learns
   slowest; at 900 / 250 / 800 steps, 1 : 1 left the tuned mix grounding 0.15 / 0.15, 3 : 1 gave 0.30 / 0.38,
   VQA unchanged). Without the shared base, the two domain models trained from the random init ended in
   different basins and their beta = 0.5 mix answered nothing right (0.00 everywhere);
3. `mix`: the two domain LLMs mixed linearly at several beta (the paper's real/synthetic weight mix);
4. stage 2, `train`: the beta = 0.5 mix tuned on both domains and all tasks (VQA, grounding, region captions);
5. `eval`: every model on held-out images of both domains (VQA accuracy, grounding Acc@IoU>=0.5);
6. the best model saved as a Hub-ready folder whose card holds the measured table (`model-index`), and a few
   questions answered through `pipeline("image-text-to-text")` with the parsed boxes drawn (`OUT/*.png`).

Every stage writes its folder atomically, so a re-run reuses finished stages unless `force=True`. One seed
gives the same images, the same training and the same table.
"""

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .processing.tasks_sphinx import TASK_INSTRUCTIONS
from .world import DOMAINS, render


@dataclass(frozen=True)
class Budget:
    """Sizes, steps and learning rates of one demo run."""

    train_images: int
    eval_images: int
    base_steps: int
    domain_steps: int
    stage2_steps: int
    betas: tuple[float, ...]
    base_learning_rate: float = 3e-3
    domain_learning_rate: float = 1e-3  # lower: the domain models must stay close enough to the base to mix
    stage2_learning_rate: float = 2e-3


# 7.8 min on 2 idle CPU cores from the pretrained parts (8.9 min from random weights, 2026-12-01)
FULL = Budget(
    train_images=800, eval_images=40, base_steps=800, domain_steps=250, stage2_steps=700, betas=(0.25, 0.5, 0.75)
)
QUICK = Budget(train_images=200, eval_images=16, base_steps=60, domain_steps=30, stage2_steps=60, betas=(0.5,))


def write_split(root: Path, domain: str, first_seed: int, count: int) -> Path:
    """Images plus the task files the SFT builders and `evaluate` read; returns the split's folder."""
    folder = root / f"{domain}-{first_seed}"
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    vqa, grounding = [], []
    for seed in range(first_seed, first_seed + count):
        image, shapes, dot = render(seed, domain)
        name = f"images/{seed}.png"  # relative to the split folder, for the SFT builders and `evaluate` alike
        image.save(folder / name)
        target = shapes[seed % len(shapes)]
        vqa.append({"id": f"{seed}-shape", "image": name, "question": f"What colour is the {target['kind']}?",
                    "answer": target["colour"], "kind": "shape colour"})  # fmt: skip
        if seed % 2 == 0:  # the dot is 7 px: at 112-px views only the sub-image crops see it at full size
            vqa.append({"id": f"{seed}-dot", "image": name, "question": "What colour is the small dot?",
                        "answer": dot["colour"], "kind": "dot colour"})  # fmt: skip
        grounding.append({"id": f"{seed}", "image": name, "expression": f"the {target['colour']} {target['kind']}",
                          "box": target["box"]})  # fmt: skip
    for name, rows in (("vqa.jsonl", vqa), ("grounding.jsonl", grounding)):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "done").write_text("")
    return folder


# Sampling weights per task file. Stage 1 gives most samples to grounding, the task that learns slowest;
# stage 2 balances the tasks and adds region captions.
STAGE1_WEIGHTS = {"vqa": 1, "referring_expression": 3}
STAGE2_WEIGHTS = {"vqa": 2, "referring_expression": 2, "region_caption": 1}
TASK_FILES = {"vqa": "vqa.jsonl", "referring_expression": "grounding.jsonl", "region_caption": "grounding.jsonl"}


def mixture_file(path: Path, splits: list[Path], weights: dict[str, int]) -> Path:
    """A task-mixture YAML at `path` over the splits' task files, each task sampled with its weight."""
    import yaml

    sources = [
        {"task": task, "path": str(split / TASK_FILES[task]), "image_root": str(split), "weight": weight}
        for split in splits
        for task, weight in weights.items()
    ]
    path.write_text(yaml.safe_dump({"seed": 0, "sources": sources}))
    return path


def _train(model: Path, mixture: Path, out: Path, steps: int, learning_rate: float, stage: str) -> Path:
    from trl import SFTConfig

    from .training import SphinxTuningArguments, train

    if (out / "model" / "config.json").is_file():
        return out / "model"
    shutil.rmtree(out, ignore_errors=True)
    args = SphinxTuningArguments(model_name_or_path=str(model), mixture=str(mixture), dtype="float32")
    config = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=16,
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


def _init(out: Path, seed: int) -> Path:
    """The miniature with the package's pretrained parts (encoders and LLM); the projector and the start/end
    embeddings keep their random initialisation from `seed`, for stage 1 to train."""
    from .build import save_model_folder
    from .inference import load_pretrained
    from .pretrain import init_miniature, load_parts

    if (out / "config.json").is_file():
        return out
    with tempfile.TemporaryDirectory() as scratch:
        processor, model = load_pretrained(str(init_miniature(Path(scratch) / "random", seed)), dtype="float32")
    load_parts(model)
    return save_model_folder(model, processor, out, provenance={"kind": "pretrained parts"})


def _mix(first: Path, second: Path, beta: float, out: Path) -> Path:
    import yaml

    from .mixing import mix

    if (out / "config.json").is_file():
        return out
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "base_model": str(first),
                "models": [
                    {"model": str(first), "parameters": {"weight": beta}},
                    {"model": str(second), "parameters": {"weight": 1 - beta}},
                ],
                "dtype": "float32",
            }
        )
    )
    return mix(recipe, out)


def _scores(model_dir: Path, splits: dict[str, Path], out: Path) -> dict[str, float]:
    from .evaluation import evaluate
    from .inference import load_pretrained

    processor, model = load_pretrained(str(model_dir), dtype="float32")
    scores = {}
    for domain, split in splits.items():
        for task, data, metric, name in (
            ("vqa", "vqa.jsonl", "accuracy", "vqa"),
            ("rec", "grounding.jsonl", "acc@0.5", "grounding"),
        ):
            folder = out / f"{domain}-{task}"
            if not (folder / "metrics.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                result = evaluate(
                    model, processor, task, split / data, folder, batch_size=16, max_new_tokens=24, progress=False
                )
            else:
                result = json.loads((folder / "metrics.json").read_text())["metrics"]
            scores[f"{name} {domain}"] = result[metric]
    return scores


@contextmanager
def _only_stage_progress():
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


def run_demo(out: str | Path = "runs/demo", quick: bool = False, force: bool = False, seed: int = 0) -> dict:
    """Run (or resume) the whole miniature recipe; returns `{model name: {metric domain: score}}`."""
    with _only_stage_progress():
        return _run_demo(Path(out).resolve(), quick, force, seed)  # the mixture files name data by absolute path


def _run_demo(out: Path, quick: bool, force: bool, seed: int) -> dict:
    if force:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    budget = QUICK if quick else FULL
    data = out / "data"
    train_splits = {d: write_split(data, d, 1000 * (seed + 1), budget.train_images) for d in DOMAINS}
    eval_splits = {d: write_split(data, d, 10_000_000 + 1000 * seed, budget.eval_images) for d in DOMAINS}
    base = _init(out / "init", seed)
    models = {"untrained": base}
    shared = mixture_file(out / "stage1-base.yaml", list(train_splits.values()), STAGE1_WEIGHTS)
    models["stage-1 base"] = _train(
        base, shared, out / "stage1-base", budget.base_steps, budget.base_learning_rate, "stage 1, shared base"
    )
    for domain in DOMAINS:
        mixture = mixture_file(out / f"stage1-{domain}.yaml", [train_splits[domain]], STAGE1_WEIGHTS)
        models[f"stage-1 {domain}"] = _train(
            models["stage-1 base"],
            mixture,
            out / f"stage1-{domain}",
            budget.domain_steps,
            budget.domain_learning_rate,
            f"stage 1, {domain} domain",
        )
    for beta in budget.betas:
        models[f"mix beta={beta:g}"] = _mix(
            models["stage-1 real"], models["stage-1 synthetic"], beta, out / f"mix-{beta:g}"
        )
    both = mixture_file(out / "stage2.yaml", list(train_splits.values()), STAGE2_WEIGHTS)
    models["tuned mix"] = _train(
        models["mix beta=0.5"], both, out / "stage2", budget.stage2_steps, budget.stage2_learning_rate, "stage 2"
    )
    table = {
        name: _scores(folder, eval_splits, out / "eval" / name.replace(" ", "_")) for name, folder in models.items()
    }
    (out / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    best = max((n for n in table if n != "untrained"), key=lambda n: _average(table[n]))
    _publish(models[best], best, table, out)
    _examples(out / "best", eval_splits["real"], out)
    return table


def _average(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def _publish(folder: Path, name: str, table: dict, out: Path):
    from .evaluation import record_in_card

    best = out / "best"
    if best.exists():
        shutil.rmtree(best)
    shutil.copytree(folder, best)
    for metric, value in table[name].items():
        record_in_card(best, metric.split()[0], f"sphinx-demo-{metric.split()[1]}", {metric.split()[0]: value})
    (best / "demo_model.txt").write_text(f"{name}\n")


def _examples(model_dir: Path, split: Path, out: Path, count: int = 3) -> list[Path]:
    """The first held-out grounding questions through the pipeline: the parsed box drawn (orange) beside the
    true one (green), and the IoU printed, hits and misses alike."""
    from transformers import pipeline

    from .data import open_image
    from .inference import draw_answer, read_answer
    from .metrics import box_iou

    pipe = pipeline("image-text-to-text", model=str(model_dir))
    rows = [json.loads(line) for line in (split / "grounding.jsonl").read_text().splitlines()][:count]
    drawn = []
    for row in rows:
        image_path = split / row["image"]
        question = TASK_INSTRUCTIONS["referring_expression"].format(expression=row["expression"])
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "path": str(image_path)}, {"type": "text", "text": question}],
            }
        ]
        answer = pipe(text=messages, max_new_tokens=24, return_full_text=False)[0]["generated_text"]
        image = open_image(image_path)
        grounded = read_answer(pipe.processor, answer, image)
        target = out / f"example_{row['id']}.png"
        draw_answer(image, grounded, truth=row["box"]).save(target)
        iou = box_iou(grounded.boxes[0], row["box"]) if grounded.boxes else 0.0
        verdict = "hit" if iou >= 0.5 else "miss"
        print(f"{row['expression']!r}: {answer.strip()!r}, IoU {iou:.2f} with the true box ({verdict}) -> {target}")
        drawn.append(target)
    return drawn


def format_table(table: dict) -> str:
    columns = list(next(iter(table.values())))
    lines = ["| model | " + " | ".join(columns) + " | average |", "|---" * (len(columns) + 2) + "|"]
    for name, scores in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[c]:.2f}" for c in columns) + f" | {_average(scores):.2f} |")
    return "\n".join(lines)
