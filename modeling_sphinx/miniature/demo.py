"""`sphinx-mllm demo`: SPHINX's recipe in miniature, end to end, offline, on a CPU.

A generated world of coloured shapes in two visual domains, "real-like" (textured, noisy, lit, cluttered) and
"synthetic" (flat and clean), each image with a small dot that only the sub-image views see at full size, goes
through the package's public pieces as the paper's recipe, on one line of models, one function of `recipe` per
stage:

1. `init_from_parts`: a tiny SPHINX with a global view and 2 x 2 sub-image views (224-px input, 112-px views
   cut into 28-px patches, no Q-Former: 5 x 19 = 95 visual tokens) assembled from the package's pretrained
   miniature parts (`sphinx-mllm demo pretrain`: encoders pretrained contrastively or self-supervised, frozen;
   a LLaMA pretrained on text), with a random projector and start/end embeddings. The patches are twice
   SPHINX's 14 px because the LLM's pass over the visual tokens is the cost of a step: with 14-px patches
   (335 tokens) the same time allowed a third of the steps;
2. `caption_stage`, stage 1: vision-language pretraining on captions, the LLM and projector trained and the
   encoders frozen, first on the real-like domain; then a copy of that model continued on the synthetic
   domain's captions, as SPHINX continues its real-world model on synthetic data;
3. `weight_mix`: the model and its continuation mixed linearly, theta = beta * theta_real + (1 - beta) *
   theta_syn, over what stage 1 trained (`recipe.STAGE_ONE_TENSORS`);
4. `task_stage`, stage 2: multi-task instruction tuning from the mix on both domains with the task-specific
   instructions (VQA, referring-expression grounding, region captions, detection), the whole stage-2 budget
   on that one model;
5. `score`: the model on held-out images of both domains (VQA exact match, grounding Acc@IoU>=0.5), each score
   with its 95 % Wilson interval, and VQA split by question type (the colour of a named shape; the colour of
   the small dot, which needs the sub-image views);
6. the model saved as a Hub-ready folder whose card holds the measured table (`model-index`), and a few
   questions answered through `pipeline("image-text-to-text")` with the parsed boxes drawn (`OUT/*.png`).

The comparisons the paper makes (the mix against its parents and a sweep of beta, the task mix, the encoders,
the scales) are the ablations' (`ablations.py`), which reuse these stages. Every stage writes its folder
atomically, so a re-run reuses finished stages unless `force=True` (a folder made with another budget or seed is
refused). One seed gives the same images, the same training and the same table.
"""

import json
import shutil
from pathlib import Path

from ..folder.atomic import atomic_output_dir, write_text_atomic
from ..processing.tasks_sphinx import TASK_INSTRUCTIONS
from .recipe import (
    FULL_BUDGET,
    QUICK_BUDGET,
    by_question_type,
    claim,
    data_splits,
    format_table,
    mix_name,
    only_stage_progress,
    recipe_line,
    score,
    stage_two,
    summarise,
)
from .world import DOMAINS


def run_demo(out: str | Path = "runs/demo", quick: bool = False, force: bool = False, seed: int = 0) -> dict:
    """Run (or resume) the whole miniature recipe; returns what `results.json` holds: the model's name, its scores
    with intervals, overall and by question type, and the drawn answers."""
    with only_stage_progress():
        return _run_demo(Path(out).resolve(), quick, force, seed)  # the mixture files name data by absolute path


MAIN_HELD_OUT = 10_000_000  # first seed of the main job's held-out images; training seeds stay below


def _run_demo(out: Path, quick: bool, force: bool, seed: int) -> dict:
    budget = QUICK_BUDGET if quick else FULL_BUDGET
    claim(out, budget, seed, force)
    train_splits, eval_splits = data_splits(out, budget, seed, budget.eval_images, MAIN_HELD_OUT)
    start = mix_name(budget.beta)
    line = recipe_line(out, train_splits, budget, seed)
    tuned = stage_two(out, start, line[start], train_splits, budget)
    outcomes = score(tuned, eval_splits, out / "eval", "eval")
    by_type = summarise(by_question_type(outcomes, eval_splits))
    del by_type["average"]  # the question types split the cells, so their average would count VQA twice
    results = {"model": f"{start} + stage 2", "scores": summarise(outcomes), "by question type": by_type}
    _publish(tuned, results, out)
    results["examples"] = _examples(out / "best", eval_splits["real"], out)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _publish(folder: Path, results: dict, out: Path):
    from ..evaluation.runner import record_in_card

    best = out / "best"
    if best.exists():
        shutil.rmtree(best)
    with atomic_output_dir(best) as staging:
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        for cell, value in results["scores"].items():
            if cell != "average":
                metric, domain = cell.split()
                # one dataset name per task: the Hub groups results by task type and dataset, and both tasks here
                # are image-text-to-text, so a shared name would file grounding under VQA
                dataset = f"sphinx-demo-{domain}-{metric.lower()}"
                record_in_card(staging, metric.lower(), dataset, {metric.lower(): value["score"]})
        (staging / "demo_model.txt").write_text(f"{results['model']}\n")


def _examples(model_dir: Path, split: Path, out: Path, count: int = 3) -> list[dict]:
    """The first held-out grounding questions through the pipeline: the parsed box drawn (orange) beside the
    true one (green) into `out`, and each answer with its IoU, hits and misses alike."""
    from transformers import pipeline

    from ..evaluation.metrics import box_iou
    from ..inference import draw_answer, read_answer
    from ..records import open_image

    pipe = pipeline("image-text-to-text", model=str(model_dir))
    rows = [json.loads(line) for line in (split / "grounding.jsonl").read_text().splitlines()][:count]
    answered = []
    for row in rows:
        image_path = split / row["image"]
        question = TASK_INSTRUCTIONS["referring_expression"].format(expression=row["expression"])
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "path": str(image_path)}, {"type": "text", "text": question}],
            }
        ]
        answer = pipe(text=messages, max_new_tokens=32, return_full_text=False)[0]["generated_text"]
        image = open_image(image_path)
        grounded = read_answer(pipe.processor, answer, image)
        target = out / f"example_{row['id']}.png"
        draw_answer(image, grounded, truth=row["box"]).save(target)
        iou = box_iou(grounded.boxes[0], row["box"]) if grounded.boxes else 0.0
        answered.append(
            {"expression": row["expression"], "answer": answer.strip(), "iou": iou, "drawing": target.name}
        )
    return answered


# The targets of the miniature's model, on both domains
TARGETS = {"VQA": 0.9, "grounding": 0.6}


def format_report(results: dict) -> str:
    """The drawn answers, the table (score and 95 % interval per cell), the scores by question type and the
    targets, each sentence decided by the numbers."""
    scores = results["scores"]
    lines = [
        f"{example['expression']!r}: {example['answer']!r}, IoU {example['iou']:.3f} with the true box "
        f"({'hit' if example['iou'] >= 0.5 else 'miss'}) -> {example['drawing']}"
        for example in results.get("examples", [])
    ]
    lines += format_table({results["model"]: scores})
    by_type = results["by question type"]
    kinds = list(dict.fromkeys(cell.rpartition(" ")[0] for cell in by_type))
    lines += ["| question | " + " | ".join(DOMAINS) + " |", "|---" * (len(DOMAINS) + 1) + "|"]
    for kind in kinds:
        found = [by_type[f"{kind} {domain}"] for domain in DOMAINS]
        shown = [f"{c['score']:.2f} ({c['low']:.2f}-{c['high']:.2f}, {c['questions']})" for c in found]
        lines.append(f"| {kind} | " + " | ".join(shown) + " |")
    lines.append("(by question type: score, 95 % interval, questions)")
    for metric, target in TARGETS.items():
        reached = [f"{domain} {scores[f'{metric} {domain}']['score']:.2f}" for domain in DOMAINS]
        met = all(scores[f"{metric} {domain}"]["score"] >= target for domain in DOMAINS)
        lines.append(f"{metric} >= {target} on both domains: {', '.join(reached)}: {'met' if met else 'not met'}")
    if results.get("examples"):
        hits = sum(example["iou"] >= 0.5 for example in results["examples"])
        lines.append(f"drawn answers: {hits} of {len(results['examples'])} hit (IoU >= 0.5)")
    return "\n".join(lines)
