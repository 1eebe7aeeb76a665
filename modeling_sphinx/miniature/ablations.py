"""`sphinx-mllm demo ablations`: the paper's four mixes, of weights, tasks, visual embeddings and scales, measured
in miniature.

The main job (`demo.py`) trains one model on SPHINX's schedule. This measures what each of the paper's mixes buys
the way its ablations do, on the same generated world with the same recipe, every arm with the same budget
(`recipe.Budget`: data, steps, batch, learning rates):

- **weights**: the line's real-like model and its synthetic continuation mixed at each beta of `BETAS` (0 is the
  continuation itself, 1 the real-like model), each followed by the same stage 2; the budget's beta (the main
  job's model) against each parent, and the curve over beta;
- **tasks**: stage 2 on all tasks together with their task-specific instructions (the main job's model) against
  one model per task trained on that task alone with as many samples of it as the mixed model sees
  (`single_task_steps`), and against the same mixed tasks under one generic instruction (`GENERIC_INSTRUCTION`,
  with which that arm is also evaluated). Every arm starts from the same weight mix;
- **visual embeddings**: the whole line (parts, stage 1 and its continuation, the mix, stage 2) with the three
  encoders' features concatenated against each encoder alone, with the same LLM parts, steps, data and seed. A
  single encoder feeds the projector fewer channels; the number of visual tokens is the same;
- **scales**: the whole line with the global view and its 2 x 2 sub-image views against the global view alone
  (`crop_grid=1`), the LLM's visual tokens per image stated for each; the question that needs the sub-images
  (the small dot's colour) is a cell of its own.

Every arm is scored on 400 held-out images per domain of its own (VQA split by question type, grounding, region
captions, detection), each cell with its 95 % Wilson interval, and each comparison is a paired difference over
the same questions. Selecting the best single encoder on these same questions favours it, so "three encoders >=
the best single encoder" is judged against an optimistic rival. Results go to `OUT/ablations/`: `results.json`,
`report.md` and one PNG per ablation. Stages already trained, the main job's included, are reused.

The main job's line trains in this process, as the demo trains it; the other arms then train `ARMS_AT_ONCE` at a
time, each in a worker process on `ARM_THREADS` thread (`_train_arms` says why), their stages' progress in
`OUT/ablations/logs/<arm>.log`.
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
    by_question_type,
    claim,
    compare,
    data_splits,
    format_table,
    mix_folder,
    mix_name,
    only_stage_progress,
    recipe_line,
    score,
    stage_two,
    summarise,
    task_stage,
    verdict,
    weight_mix,
)

# One instruction for every task, the task's own fields (question, expression, box or category) as its content
GENERIC_INSTRUCTION = "Answer about the image: {content}"
HELD_OUT = 40_000_000  # first seed of the ablations' held-out images, apart from the main job's
# held-out images per domain and arm (2 VQA, 1 grounding, 1 region-caption and 1.4 detection questions each): 400
# put every cell's 95 % interval within +-0.05 (+-0.049 at a score of 0.5)
HELD_OUT_IMAGES, QUICK_HELD_OUT_IMAGES = 400, 8
BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
ENCODER_ARMS = {"clip": "CLIP-style ViT", "convnext": "ConvNeXt", "dinov2": "DINOv2-style ViT"}
TRAINED_TASK = {
    "VQA": "vqa",
    "grounding": "referring_expression",
    "region-caption": "region_caption",
    "detection": "detection",
}
ALL_TASKS, ALONE, GENERIC = "all tasks, task instructions", "each task alone", "all tasks, one generic instruction"
THREE_ENCODERS = "CLIP + ConvNeXt + DINOv2"
WITH_SUB_IMAGES, GLOBAL_ONLY = "global view + 2 x 2 sub-images", "global view alone"


def beta_arm(beta: float) -> str:
    parent = {0.0: " (the synthetic continuation)", 1.0: " (the real-like model)"}.get(beta, "")
    return f"beta={beta:g}{parent}"


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


def line_budget(line: dict[str, Path], stage2: Path) -> dict:
    """What a whole line spent: each leg of stage 1, and stage 2."""
    return {
        "stage 1 real": spent(line["real"]),
        "stage 1 synthetic": spent(line["synthetic"]),
        "stage 2": spent(stage2),
    }


def visual_tokens(model_dir: Path) -> int:
    from .. import SphinxConfig

    return SphinxConfig.from_pretrained(model_dir).num_image_tokens


class Run:
    """One ablations run: its folders, budget, data and the main job's line, and how an arm is scored."""

    def __init__(self, out: Path, budget: Budget, seed: int, held_out_images: int):
        self.out, self.root, self.budget, self.seed = out, out / "ablations", budget, seed
        self.train, self.held_out = data_splits(out, budget, seed, held_out_images, HELD_OUT)
        self.line = recipe_line(out, self.train, budget, seed)
        self.mixed = mix_name(budget.beta)
        self.model = stage_two(out, self.mixed, self.line[self.mixed], self.train, budget)

    def main_job(self, arm: str, split_vqa: bool = False) -> dict:
        """The main job's model scored as `arm` (evaluated once, by the first ablation that asks)."""
        return self.score(self.model, f"stage2-{mix_folder(self.budget.beta)}", arm, split_vqa)

    def score(self, model: Path, folder: str, arm: str, split_vqa: bool = False, **options) -> dict:
        """Every task on every domain's held-out images (`split_vqa`: VQA by question type)."""
        found = score(model, self.held_out, self.root / "eval" / folder, f"eval, {arm}", EVERY_TASK, **options)
        return by_question_type(found, self.held_out) if split_vqa else found


def _sweep_arm(run: Run, beta: float) -> tuple[dict, Path]:
    """Stage 2 from the line's mix at `beta`, scored."""
    mixed = weight_mix(run.line["real"], run.line["synthetic"], beta, run.root / mix_folder(beta))
    model = stage_two(run.root, mix_name(beta), mixed, run.train, run.budget)
    return run.score(model, f"stage2-{mix_folder(beta)}", beta_arm(beta)), model


def _weights(run: Run) -> dict:
    outcomes, budgets = {}, {}
    for beta in BETAS:
        arm = beta_arm(beta)
        if beta == run.budget.beta:
            model, outcomes[arm] = run.model, run.main_job(arm)
        else:
            outcomes[arm], model = _sweep_arm(run, beta)
        budgets[arm] = line_budget(run.line, model)
    mixed = beta_arm(run.budget.beta)
    pairs = {f"{mixed} - {beta_arm(parent)}": (mixed, beta_arm(parent)) for parent in (1.0, 0.0)}
    found = _ablation(outcomes, budgets, pairs)
    found["beta"] = {beta_arm(beta): beta for beta in BETAS}
    return found


def _alone_arm(run: Run, name: str) -> tuple[dict, Path]:
    """Stage 2 on the task `name` alone, from the mix, with its share of the steps; scored on that task."""
    task, label = TRAINED_TASK[name], f"{name} alone"
    model = task_stage(
        run.line[run.mixed],
        list(run.train.values()),
        run.root / f"alone-{task}",
        run.budget,
        f"stage 2, {label}",
        weights={task: 1},
        steps=single_task_steps(run.budget)[task],
    )
    found = score(model, run.held_out, run.root / "eval" / f"alone-{task}", f"eval, {label}", {name: EVERY_TASK[name]})
    return found, model


def _generic_arm(run: Run) -> tuple[dict, Path]:
    """Stage 2 on all tasks from the mix, every instruction replaced by the generic one; scored with it."""
    generic = task_stage(
        run.line[run.mixed],
        list(run.train.values()),
        run.root / "generic-instruction",
        run.budget,
        f"stage 2, {GENERIC}",
        prompt_template=GENERIC_INSTRUCTION,
    )
    return run.score(generic, "generic-instruction", GENERIC, prompt_template=GENERIC_INSTRUCTION), generic


def _tasks(run: Run) -> dict:
    outcomes = {ALL_TASKS: run.main_job(ALL_TASKS)}
    budgets = {ALL_TASKS: spent(run.model)}
    outcomes[ALONE], budgets[ALONE] = {}, {}
    for name in TRAINED_TASK:
        found, model = _alone_arm(run, name)
        outcomes[ALONE].update(found)
        budgets[ALONE][name] = spent(model)
    outcomes[GENERIC], generic = _generic_arm(run)
    budgets[GENERIC] = spent(generic)
    pairs = {f"{ALL_TASKS} - {ALONE}": (ALL_TASKS, ALONE), f"{ALL_TASKS} - {GENERIC}": (ALL_TASKS, GENERIC)}
    return _ablation(outcomes, budgets, pairs)


def _line_arm(run: Run, folder: str, arm: str, split_vqa: bool = False, **line_options) -> tuple[dict, dict, Path]:
    """The whole line again in `ablations/<folder>` with `line_options`, then stage 2 from its mix."""
    label = f" ({arm})"
    line = recipe_line(run.root / folder, run.train, run.budget, run.seed, label=label, **line_options)
    model = stage_two(run.root / folder, run.mixed, line[run.mixed], run.train, run.budget, label=label)
    return run.score(model, folder, arm, split_vqa), line_budget(line, model), model


def _encoder_arm(run: Run, encoder: str) -> tuple[dict, dict, Path]:
    """The whole line with `encoder` alone."""
    return _line_arm(run, f"encoder-{encoder}", f"{ENCODER_ARMS[encoder]} alone", encoders=(encoder,))


def _global_view_arm(run: Run) -> tuple[dict, dict, Path]:
    """The whole line with the global view alone (`crop_grid=1`), VQA split by question type."""
    return _line_arm(run, "global-view", GLOBAL_ONLY, True, crop_grid=1)


def _encoders(run: Run) -> dict:
    outcomes = {THREE_ENCODERS: run.main_job(THREE_ENCODERS)}
    budgets = {THREE_ENCODERS: line_budget(run.line, run.model)}
    for encoder, name in ENCODER_ARMS.items():
        outcomes[f"{name} alone"], budgets[f"{name} alone"], _ = _encoder_arm(run, encoder)
    single = [f"{name} alone" for name in ENCODER_ARMS.values()]
    found = _ablation(outcomes, budgets, {f"{THREE_ENCODERS} - {arm}": (THREE_ENCODERS, arm) for arm in single})
    found["best single encoder"] = max(single, key=lambda arm: found["arms"][arm]["average"]["score"])
    return found


def _scales(run: Run) -> dict:
    outcomes = {WITH_SUB_IMAGES: run.main_job(WITH_SUB_IMAGES, split_vqa=True)}
    budgets = {WITH_SUB_IMAGES: line_budget(run.line, run.model)}
    tokens = {WITH_SUB_IMAGES: visual_tokens(run.model)}
    outcomes[GLOBAL_ONLY], budgets[GLOBAL_ONLY], model = _global_view_arm(run)
    tokens[GLOBAL_ONLY] = visual_tokens(model)
    found = _ablation(outcomes, budgets, {f"{WITH_SUB_IMAGES} - {GLOBAL_ONLY}": (WITH_SUB_IMAGES, GLOBAL_ONLY)})
    found["visual tokens"] = tokens
    return found


# how the arms besides the main job's line run (`_train_arms` says why)
ARMS_AT_ONCE = 2
ARM_THREADS = 1


def _arms(budget: Budget) -> list[tuple]:
    """The arms besides the main job's model, longest first: each trains and scores in its own folders, so that
    they can run in any order and at the same time; the ablations then read them back."""
    lines = [("encoder", encoder) for encoder in ENCODER_ARMS] + [("global view",)]
    sweep = [("beta", beta) for beta in BETAS if beta != budget.beta]
    steps = single_task_steps(budget)
    alone = sorted(TRAINED_TASK, key=lambda name: -steps[TRAINED_TASK[name]])
    return lines + sweep + [("generic",)] + [("alone", name) for name in alone]


ARM_RUNNERS = {
    "encoder": _encoder_arm,
    "global view": _global_view_arm,
    "beta": _sweep_arm,
    "generic": _generic_arm,
    "alone": _alone_arm,
}


def _start_arm_worker():
    import torch

    torch.set_num_threads(ARM_THREADS)


def _train_arm(out: Path, budget: Budget, seed: int, held_out_images: int, arm: tuple):
    """One arm in a worker; its stages' progress bars go to `ablations/logs/<arm>.log` (two workers' bars on one
    console would overwrite each other; the console shows the arms done)."""
    from contextlib import redirect_stderr

    logs = out / "ablations" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = "-".join(str(part) for part in arm).replace(" ", "-")
    with open(logs / f"{name}.log", "w") as log, redirect_stderr(log), only_stage_progress():
        run = Run(out, budget, seed, held_out_images)
        ARM_RUNNERS[arm[0]](run, *arm[1:])


def _train_arms(run: Run, held_out_images: int):
    """Every arm but the main job's, `ARMS_AT_ONCE` at a time in worker processes of `ARM_THREADS` thread each.

    The model is small enough that two threads on one arm leave much of two cores idle (the collation and the
    training loop are Python, one core; the model's operations are too small to split well): two arms at once on
    one thread each do about 1.5x the work of one arm on two threads (`benchmarks/bench_arms_at_once.py`). One
    thread rounds some sums in another order than two, so these arms run on one thread whatever the machine; the
    main job's line runs in this process, as the demo runs it, so that a run after the demo and a run from
    nothing agree."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm.auto import tqdm

    arms = _arms(run.budget)
    context = multiprocessing.get_context("spawn")  # a forked child would inherit this process's thread pools
    with (
        ProcessPoolExecutor(ARMS_AT_ONCE, mp_context=context, initializer=_start_arm_worker) as pool,
        tqdm(total=len(arms), desc=f"ablation arms, {ARMS_AT_ONCE} at a time", dynamic_ncols=True) as bar,
    ):
        pending = {pool.submit(_train_arm, run.out, run.budget, run.seed, held_out_images, arm) for arm in arms}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a worker's error, raised here
                    bar.update()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # drops the arms not started; a running one finishes, kept
            raise


def run_ablations(out: str | Path = "runs/demo", quick: bool = False, force: bool = False, seed: int = 0) -> dict:
    """Run (or resume) the four ablations in `out` (the main job's folder, whose stages they reuse); returns what
    `OUT/ablations/results.json` holds."""
    with only_stage_progress():
        return _run_ablations(Path(out).resolve(), quick, force, seed)


TITLES = {
    "weights": "Weight mix: stage 2 from beta * real-like + (1 - beta) * its synthetic continuation",
    "tasks": "Task mix: stage 2 on all tasks, each task alone, one generic instruction",
    "visual embeddings": "Visual-embedding mix: three encoders against each alone",
    "scales": "Scales: the global view with and without the sub-image views",
}


def _run_ablations(out: Path, quick: bool, force: bool, seed: int) -> dict:
    budget = QUICK_BUDGET if quick else FULL_BUDGET
    claim(out, budget, seed, force)
    held_out_images = QUICK_HELD_OUT_IMAGES if quick else HELD_OUT_IMAGES
    run = Run(out, budget, seed, held_out_images)
    _train_arms(run, held_out_images)
    results = {"weights": _weights(run), "tasks": _tasks(run), "visual embeddings": _encoders(run)}
    results["scales"] = _scales(run)
    write_text_atomic(run.root / "results.json", json.dumps(results, indent=2) + "\n")
    for ablation, found in results.items():
        plot_ablation(found["arms"], TITLES[ablation], run.root / f"{ablation.replace(' ', '_')}.png")
    plot_curve(results["weights"], run.root / "weights_curve.png")
    write_text_atomic(run.root / "report.md", format_ablations(results) + "\n")
    return results


def _ablation(outcomes: dict, budgets: dict, pairs: dict[str, tuple[str, str]]) -> dict:
    cells = list(next(iter(outcomes.values())))
    ordered = {arm: {cell: hits[cell] for cell in cells} for arm, hits in outcomes.items()}
    return {
        "arms": {arm: summarise(hits) for arm, hits in ordered.items()},
        "budgets": budgets,
        "comparisons": {pair: compare(ordered[a], ordered[b]) for pair, (a, b) in pairs.items()},
    }


# what the paper claims of each comparison
CLAIMS = {
    "weights": "the mix >= this parent",
    "tasks": {
        f"{ALL_TASKS} - {ALONE}": "multi-task >= single-task",
        f"{ALL_TASKS} - {GENERIC}": "task-specific instructions >= one generic instruction",
    },
    "scales": "sub-image views >= the global view alone",
}


def _claim_of(ablation: str, pair: str, found: dict) -> str:
    if ablation == "tasks":
        return CLAIMS[ablation][pair]
    if ablation == "visual embeddings":
        best = pair == f"{THREE_ENCODERS} - {found['best single encoder']}"
        return f"three encoders >= {'the best single encoder' if best else 'this single encoder'}"
    return CLAIMS[ablation]


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
        if "visual tokens" in found:
            tokens = ", ".join(f"{arm} {count}" for arm, count in found["visual tokens"].items())
            lines.append(f"{ablation}: visual tokens per image, {tokens}; same steps, batch and data")
        lines.append("")
    return "\n".join(lines).rstrip()


ARM_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def _chart(title: str, width: int, height: int, left: int, top: int, plot_height: int):
    """A white canvas with `title` and a 0-1 score axis: `(image, draw, y_of, small font)`."""
    from PIL import Image, ImageDraw, ImageFont

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
    return image, draw, y_of, small


def _legend(draw, names, left: int, small):
    for index, (name, colour) in enumerate(zip(names, ARM_COLOURS, strict=False)):
        y = 34 + 18 * index
        draw.rectangle([left, y, left + 10, y + 10], fill=colour)
        draw.text((left + 16, y - 1), name, fill="black", font=small)


def plot_ablation(arms: dict[str, dict], title: str, path: Path) -> Path:
    """Arms side by side per cell (task x domain, then the average): each score a dot, its 95 % interval a bar;
    written atomically as a PNG."""
    cells = list(next(iter(arms.values())))
    group, left, top, plot_height = 30 + 22 * len(arms), 50, 60 + 18 * len(arms), 300
    width, height = left + group * len(cells) + 20, top + plot_height + 50
    image, draw, y_of, small = _chart(title, width, height, left, top, plot_height)
    _legend(draw, arms, left, small)
    for column, cell in enumerate(cells):
        x0 = left + group * column
        for index, (summary, colour) in enumerate(zip(arms.values(), ARM_COLOURS, strict=False)):
            x = x0 + 20 + 22 * index
            value = summary[cell]
            draw.line([(x, y_of(value["high"])), (x, y_of(value["low"]))], fill=colour, width=3)
            draw.ellipse([x - 4, y_of(value["score"]) - 4, x + 4, y_of(value["score"]) + 4], fill=colour)
        task, _, domain = cell.rpartition(" ") if cell != "average" else (cell, "", "")
        for row, word in enumerate((task, domain)):
            draw.text((x0 + group / 2, top + plot_height + 8 + 14 * row), word, fill="black", font=small, anchor="ma")
    return write_atomic(path, lambda staging: image.save(staging, format="PNG"))


def plot_curve(weights: dict, path: Path) -> Path:
    """The weights ablation as curves over beta: each task's score over both domains (thin) and the average of
    the cells with its 95 % interval (thick, black); written atomically as a PNG."""
    arms, betas = weights["arms"], weights["beta"]
    cells = [cell for cell in next(iter(arms.values())) if cell != "average"]
    tasks = list(dict.fromkeys(cell.rpartition(" ")[0] for cell in cells))
    left, top, plot_height, plot_width = 50, 60 + 18 * len(tasks), 300, 480
    image, draw, y_of, small = _chart(
        "Weight mix: score after stage 2 against beta", left + plot_width + 40, top + plot_height + 50, left, top,
        plot_height,
    )  # fmt: skip
    _legend(draw, [f"{task} (both domains)" for task in tasks], left, small)

    def x_of(beta: float) -> float:
        return left + 10 + (plot_width - 20) * beta

    def task_score(arm: str, task: str) -> float:
        scores = [arms[arm][cell]["score"] for cell in cells if cell.rpartition(" ")[0] == task]
        return sum(scores) / len(scores)

    for beta in sorted(set(betas.values())):
        draw.text((x_of(beta), top + plot_height + 8), f"{beta:g}", fill="black", font=small, anchor="ma")
    draw.text((left + plot_width / 2, top + plot_height + 24), "beta (1: the real-like model, 0: its synthetic "
              "continuation); black: the average of the cells, 95 % interval", fill="black", font=small,
              anchor="ma")  # fmt: skip
    ordered = sorted(arms, key=betas.get)
    for task, colour in zip(tasks, ARM_COLOURS, strict=False):
        points = [(x_of(betas[arm]), y_of(task_score(arm, task))) for arm in ordered]
        draw.line(points, fill=colour, width=1)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    average = [arms[arm]["average"] for arm in ordered]
    draw.line(
        [(x_of(betas[arm]), y_of(a["score"])) for arm, a in zip(ordered, average, strict=True)], fill="black", width=3
    )
    for arm, found in zip(ordered, average, strict=True):
        x = x_of(betas[arm])
        draw.line([(x, y_of(found["high"])), (x, y_of(found["low"]))], fill="black", width=2)
        draw.ellipse([x - 4, y_of(found["score"]) - 4, x + 4, y_of(found["score"]) + 4], fill="black")
    return write_atomic(path, lambda staging: image.save(staging, format="PNG"))
