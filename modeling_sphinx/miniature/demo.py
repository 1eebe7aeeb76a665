"""`sphinx-mllm demo`: SPHINX's recipe in miniature, end to end, offline, on a CPU.

A generated world of coloured shapes in two visual domains, "real-like" (textured, noisy, lit, cluttered) and
"synthetic" (flat and clean), each image with a small dot that only the sub-image views see at full size, goes
through the package's public pieces as the paper's recipe, one function of `recipe` per stage:

1. `init_from_parts`: a tiny SPHINX with a global view and 2 x 2 sub-image views (224-px input, 112-px views
   cut into 28-px patches, no Q-Former: 5 x 19 = 95 visual tokens) assembled from the package's pretrained
   miniature parts (`sphinx-mllm demo pretrain`: encoders pretrained contrastively or self-supervised, frozen;
   a LLaMA pretrained on text), with a random projector and start/end embeddings. The patches are twice
   SPHINX's 14 px because the LLM's pass over the visual tokens is the cost of a step: with 14-px patches
   (335 tokens) the same time allowed a third of the steps;
2. `caption_stage`, stage 1: vision-language pretraining on captions, the LLM and projector trained and the
   encoders frozen, once on the real-like domain and once on the synthetic one, both from the same init (as
   SPHINX's two LLMs both start from LLaMA-2);
3. `weight_mix`: the two stage-1 models mixed linearly, theta = beta * theta_real + (1 - beta) * theta_syn;
4. `task_stage`, stage 2: multi-task instruction tuning on both domains with the task-specific instructions
   (VQA, referring-expression grounding, region captions, detection), from the mix and, for the paper's
   comparison, from each parent with the same data, steps and seed;
5. `score`: every stage-2 model on held-out images of both domains (VQA exact match, grounding Acc@IoU>=0.5),
   each score with its 95 % Wilson interval, and the mix against each parent as a paired difference over the
   same questions;
6. the best model saved as a Hub-ready folder whose card holds the measured table (`model-index`), and a few
   questions answered through `pipeline("image-text-to-text")` with the parsed boxes drawn (`OUT/*.png`).

Every stage writes its folder atomically, so a re-run reuses finished stages unless `force=True` (a folder made
with another budget or seed is refused). One seed gives the same images, the same training and the same table.
`recipe.Budget` holds everything a run spends, so the ablations (`ablations.py`, which run the same stages) give
each arm the same.
"""

import json
import shutil
from pathlib import Path

from ..folder.atomic import atomic_output_dir, write_text_atomic
from ..processing.tasks_sphinx import TASK_INSTRUCTIONS
from .recipe import (
    FULL_BUDGET,
    QUICK_BUDGET,
    claim,
    compare,
    data_splits,
    format_table,
    mix_name,
    only_stage_progress,
    recipe_starts,
    score,
    stage_two,
    summarise,
    verdict,
)
from .world import DOMAINS


def run_demo(out: str | Path = "runs/demo", quick: bool = False, force: bool = False, seed: int = 0) -> dict:
    """Run (or resume) the whole miniature recipe; returns what `results.json` holds: every stage-2 model's
    scores with intervals, the mix against each parent, and the best model's name."""
    with only_stage_progress():
        return _run_demo(Path(out).resolve(), quick, force, seed)  # the mixture files name data by absolute path


MAIN_HELD_OUT = 10_000_000  # first seed of the main job's held-out images; training seeds stay below


def _run_demo(out: Path, quick: bool, force: bool, seed: int) -> dict:
    budget = QUICK_BUDGET if quick else FULL_BUDGET
    claim(out, budget, seed, force)
    train_splits, eval_splits = data_splits(out, budget, seed, budget.eval_images, MAIN_HELD_OUT)
    starts = recipe_starts(out, train_splits, budget, seed)
    tuned, outcomes = {}, {}
    for start, folder in starts.items():
        tuned[f"{start} + stage 2"] = stage_two(out, start, folder, train_splits, budget)
    for name, folder in tuned.items():
        outcomes[name] = score(folder, eval_splits, out / "eval" / name.replace(" ", "_"), f"eval, {name}")
    mixed_tuned = f"{mix_name(budget)} + stage 2"
    results = {
        "models": {name: summarise(cells) for name, cells in outcomes.items()},
        "weight mix": {
            f"{mixed_tuned} - {parent} + stage 2": compare(outcomes[mixed_tuned], outcomes[f"{parent} + stage 2"])
            for parent in DOMAINS
        },
    }
    results["best"] = max(results["models"], key=lambda n: results["models"][n]["average"]["score"])
    _publish(tuned[results["best"]], results, out)
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
        for cell, value in results["models"][results["best"]].items():
            if cell != "average":
                metric, domain = cell.split()
                # one dataset name per task: the Hub groups results by task type and dataset, and both tasks here
                # are image-text-to-text, so a shared name would file grounding under VQA
                dataset = f"sphinx-demo-{domain}-{metric.lower()}"
                record_in_card(staging, metric.lower(), dataset, {metric.lower(): value["score"]})
        (staging / "demo_model.txt").write_text(f"{results['best']}\n")


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


# The targets of the miniature: the best model on both domains
TARGETS = {"VQA": 0.9, "grounding": 0.6}


def format_report(results: dict) -> str:
    """The table (score and 95 % interval per cell), the weight-mix comparison and the targets, each sentence
    decided by the numbers."""
    models = results["models"]
    lines = [
        f"{example['expression']!r}: {example['answer']!r}, IoU {example['iou']:.3f} with the true box "
        f"({'hit' if example['iou'] >= 0.5 else 'miss'}) -> {example['drawing']}"
        for example in results.get("examples", [])
    ]
    lines += format_table(models, results["best"])
    for pair, found in results["weight mix"].items():
        said = verdict(
            found,
            "the mix is better: the paper's direction holds",
            "the mix is worse: the paper's direction does not hold here",
        )
        lines.append(
            f"weight mix, two-domain average, {pair}: {found['difference']:+.3f} "
            f"(95 % interval {found['low']:+.3f} to {found['high']:+.3f}): {said}"
        )
    best = models[results["best"]]
    for metric, target in TARGETS.items():
        reached = [f"{domain} {best[f'{metric} {domain}']['score']:.2f}" for domain in DOMAINS]
        met = all(best[f"{metric} {domain}"]["score"] >= target for domain in DOMAINS)
        lines.append(f"best model, {metric} >= {target}: {', '.join(reached)}: {'met' if met else 'not met'}")
    return "\n".join(lines)
