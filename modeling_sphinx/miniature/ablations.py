"""`sphinx-mllm demo ablations`: what SPHINX's task mix and visual-embedding mix buy, measured in miniature.

The main job (`demo.py`) measures the paper's first mix, of weights. This measures the other two the way the
paper's ablations do, on the same generated world with the same recipe, and every arm gets the same budget:

- **task mix**: stage 2 on all tasks together with their task-specific instructions (the main job's stage 2
  from the weight mix, reused) against one model per task trained on that task alone with as many samples of
  it as the mixed model sees (`single_task_steps`), and against the same mixed tasks under one generic
  instruction (`GENERIC_INSTRUCTION`, with which that arm is also evaluated). Every arm starts from the same
  weight mix;
- **visual-embedding mix**: the whole recipe (parts, stage 1 on each domain, the weight mix, stage 2) with the
  three encoders' features concatenated (the main job's model) against each encoder alone, with the same LLM
  parts, steps, data and seed. A single encoder feeds the projector fewer channels; the number of visual
  tokens, and so the LLM's work, is the same.

Every arm is scored on 400 held-out images per domain of its own (VQA, grounding, region captions, detection),
each cell with its 95 % Wilson interval, and each comparison is a paired difference over the same questions.
Selecting the best single encoder on these same questions favours it, so "three encoders >= the best single
encoder" is judged against an optimistic rival. Results go to `OUT/ablations/`: `results.json`, `report.md`
and one PNG per ablation. Stages already trained, the main job's included, are reused.
"""

import json
from pathlib import Path

from ..folder.atomic import write_atomic, write_text_atomic
from .recipe import (
    EVERY_TASK,
    FULL_BUDGET,
    QUICK_BUDGET,
    TASK_WEIGHTS,
    Budget,
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
    task_stage,
    verdict,
)
from .world import DOMAINS

# One instruction for every task, the task's own fields (question, expression, box or category) as its content
GENERIC_INSTRUCTION = "Answer about the image: {content}"
HELD_OUT = 40_000_000  # first seed of the ablations' held-out images, apart from the main job's
# held-out images per domain and arm (1.5 VQA, 1 grounding, 1 region-caption and 1.4 detection questions each): 400
# put every cell's 95 % interval within +-0.05 (+-0.049 at a score of 0.5)
HELD_OUT_IMAGES, QUICK_HELD_OUT_IMAGES = 400, 8
ENCODER_ARMS = {"clip": "CLIP-style ViT", "convnext": "ConvNeXt", "dinov2": "DINOv2-style ViT"}
TRAINED_TASK = {
    "VQA": "vqa",
    "grounding": "referring_expression",
    "region-caption": "region_caption",
    "detection": "detection",
}
ALL_TASKS, ALONE, GENERIC = "all tasks, task instructions", "each task alone", "all tasks, one generic instruction"
THREE_ENCODERS = "CLIP + ConvNeXt + DINOv2"


def single_task_steps(budget: Budget, weights: dict[str, int] = TASK_WEIGHTS) -> dict[str, int]:
    """Steps of each task trained alone: its share of the mixed stage 2 (same batch), so a single-task model sees
    as many samples of its task as the mixed one."""
    total = sum(weights.values())
    return {task: round(budget.task_steps * weight / total) for task, weight in weights.items()}


def spent(model_dir: Path) -> dict:
    """What a training run spent, read back from its trainer state and its mixture file: steps, batch size, the
    last learning rate, and the samples of each task (steps x batch x the task's share of the weights)."""
    import yaml

    run = model_dir.parent
    state = json.loads((run / "trainer_state.json").read_text())
    weights = {}
    for source in yaml.safe_load((run.parent / f"{run.name}.yaml").read_text())["sources"]:
        weights[source["task"]] = weights.get(source["task"], 0) + source["weight"]
    samples = state["global_step"] * state["train_batch_size"]
    return {
        "steps": state["global_step"],
        "batch_size": state["train_batch_size"],
        "learning_rate": [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e][-1],
        "samples": {task: samples * weight / sum(weights.values()) for task, weight in weights.items()},
    }


def _tasks_alone(root, start, train, budget, held_out) -> tuple[dict, dict]:
    outcomes, budgets = {}, {}
    steps = single_task_steps(budget)
    for name, task in TRAINED_TASK.items():
        model = task_stage(
            start,
            list(train.values()),
            root / f"alone-{task}",
            budget,
            f"stage 2, {name} alone",
            weights={task: 1},
            steps=steps[task],
        )
        outcomes.update(
            score(
                model,
                held_out,
                root / "eval" / f"alone-{task}",
                f"eval, {name} alone",
                evaluations={name: EVERY_TASK[name]},
            )
        )
        budgets[name] = spent(model)
    return outcomes, budgets


def _recipe_budget(starts: dict[str, Path], stage2: Path) -> dict:
    parents = {f"stage 1 {domain}": spent(starts[domain]) for domain in DOMAINS}
    return {**parents, "stage 2": spent(stage2)}


def run_ablations(out: str | Path = "runs/demo", quick: bool = False, force: bool = False, seed: int = 0) -> dict:
    """Run (or resume) both ablations in `out` (the main job's folder, whose stages they reuse); returns what
    `OUT/ablations/results.json` holds."""
    with only_stage_progress():
        return _run_ablations(Path(out).resolve(), quick, force, seed)


def _run_ablations(out: Path, quick: bool, force: bool, seed: int) -> dict:
    budget = QUICK_BUDGET if quick else FULL_BUDGET
    claim(out, budget, seed, force)
    root = out / "ablations"
    held_out_images = QUICK_HELD_OUT_IMAGES if quick else HELD_OUT_IMAGES
    train, held_out = data_splits(out, budget, seed, held_out_images, HELD_OUT)
    mixed = mix_name(budget)
    starts = recipe_starts(out, train, budget, seed)
    mixed_model = stage_two(out, mixed, starts[mixed], train, budget)
    every = {"evaluations": EVERY_TASK}
    outcomes = {ALL_TASKS: score(mixed_model, held_out, root / "eval" / "all-tasks", f"eval, {ALL_TASKS}", **every)}
    budgets = {ALL_TASKS: spent(mixed_model)}
    outcomes[ALONE], budgets[ALONE] = _tasks_alone(root, starts[mixed], train, budget, held_out)
    generic = task_stage(
        starts[mixed],
        list(train.values()),
        root / "generic-instruction",
        budget,
        f"stage 2, {GENERIC}",
        prompt_template=GENERIC_INSTRUCTION,
    )
    outcomes[GENERIC] = score(
        generic,
        held_out,
        root / "eval" / "generic-instruction",
        f"eval, {GENERIC}",
        prompt_template=GENERIC_INSTRUCTION,
        **every,
    )
    budgets[GENERIC] = spent(generic)
    task_mix = _ablation(
        outcomes,
        budgets,
        {
            f"{ALL_TASKS} - {ALONE}": (ALL_TASKS, ALONE),
            f"{ALL_TASKS} - {GENERIC}": (ALL_TASKS, GENERIC),
        },
    )

    outcomes = {THREE_ENCODERS: outcomes[ALL_TASKS]}
    budgets = {THREE_ENCODERS: _recipe_budget(starts, mixed_model)}
    for encoder, name in ENCODER_ARMS.items():
        arm, label = f"{name} alone", f" ({name} alone)"
        recipe = root / f"encoder-{encoder}"
        alone = recipe_starts(recipe, train, budget, seed, encoders=(encoder,), label=label)
        model = stage_two(recipe, mixed, alone[mixed], train, budget, label=label)
        outcomes[arm] = score(model, held_out, root / "eval" / f"encoder-{encoder}", f"eval, {arm}", **every)
        budgets[arm] = _recipe_budget(alone, model)
    single = [f"{name} alone" for name in ENCODER_ARMS.values()]
    best = max(single, key=lambda arm: summarise(outcomes[arm])["average"]["score"])
    visual = _ablation(outcomes, budgets, {f"{THREE_ENCODERS} - {arm}": (THREE_ENCODERS, arm) for arm in single})
    visual["best single encoder"] = best

    results = {"task mix": task_mix, "visual-embedding mix": visual}
    write_text_atomic(root / "results.json", json.dumps(results, indent=2) + "\n")
    plot_ablation(
        task_mix["arms"],
        "Task mix: stage 2 on all tasks, each task alone, one generic instruction",
        root / "task_mix.png",
    )
    plot_ablation(
        visual["arms"], "Visual-embedding mix: three encoders against each alone", root / "visual_embedding_mix.png"
    )
    write_text_atomic(root / "report.md", format_ablations(results) + "\n")
    return results


def _ablation(outcomes: dict, budgets: dict, pairs: dict[str, tuple[str, str]]) -> dict:
    cells = list(next(iter(outcomes.values())))
    ordered = {arm: {cell: hits[cell] for cell in cells} for arm, hits in outcomes.items()}
    return {
        "arms": {arm: summarise(hits) for arm, hits in ordered.items()},
        "budgets": budgets,
        "comparisons": {pair: compare(ordered[a], ordered[b]) for pair, (a, b) in pairs.items()},
    }


# what the paper claims of each comparison of the task mix
TASK_CLAIMS = {
    f"{ALL_TASKS} - {ALONE}": "multi-task >= single-task",
    f"{ALL_TASKS} - {GENERIC}": "task-specific instructions >= one generic instruction",
}


def _claim_of(ablation: str, pair: str, found: dict) -> str:
    if ablation == "task mix":
        return TASK_CLAIMS[pair]
    best = pair == f"{THREE_ENCODERS} - {found['best single encoder']}"
    return f"three encoders >= {'the best single encoder' if best else 'this single encoder'}"


def format_ablations(results: dict) -> str:
    """A table per ablation (every arm x task x domain with 95 % intervals) and a line per comparison saying, from
    the numbers, whether the paper's direction holds and by how much."""
    lines = []
    for ablation, found in results.items():
        lines += [f"## {ablation}", "", *format_table(found["arms"]), ""]
        for pair, difference in found["comparisons"].items():
            paper = _claim_of(ablation, pair, found)
            said = verdict(
                difference,
                f"better: the paper's direction ({paper}) holds",
                f"worse: the paper's direction ({paper}) does not hold here",
            )
            lines.append(
                f"{ablation}, average of the cells, {pair}: {difference['difference']:+.3f} (95 % interval "
                f"{difference['low']:+.3f} to {difference['high']:+.3f}): {said}"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


ARM_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def plot_ablation(arms: dict[str, dict], title: str, path: Path) -> Path:
    """Arms side by side per cell (task x domain, then the average): each score a dot, its 95 % interval a bar;
    written atomically as a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    cells = list(next(iter(arms.values())))
    group, left, top, plot_height = 30 + 22 * len(arms), 50, 60 + 18 * len(arms), 300
    width, height = left + group * len(cells) + 20, top + plot_height + 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    draw.text((left, 8), title, fill="black", font=font)

    def y_of(value: float) -> float:
        return top + plot_height * (1 - value)

    for tick in range(6):
        y = y_of(tick / 5)
        draw.line([(left, y), (width - 20, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{tick / 5:.1f}", fill="black", font=small, anchor="rm")
    for index, (arm, colour) in enumerate(zip(arms, ARM_COLOURS, strict=False)):
        y = 34 + 18 * index
        draw.rectangle([left, y, left + 10, y + 10], fill=colour)
        draw.text((left + 16, y - 1), arm, fill="black", font=small)
    for column, cell in enumerate(cells):
        x0 = left + group * column
        for index, (summary, colour) in enumerate(zip(arms.values(), ARM_COLOURS, strict=False)):
            x = x0 + 20 + 22 * index
            value = summary[cell]
            draw.line([(x, y_of(value["high"])), (x, y_of(value["low"]))], fill=colour, width=3)
            draw.ellipse([x - 4, y_of(value["score"]) - 4, x + 4, y_of(value["score"]) + 4], fill=colour)
        task, _, domain = cell.partition(" ")
        for row, word in enumerate((task, domain)):
            draw.text((x0 + group / 2, top + plot_height + 8 + 14 * row), word, fill="black", font=small, anchor="ma")
    return write_atomic(path, lambda staging: image.save(staging, format="PNG"))
