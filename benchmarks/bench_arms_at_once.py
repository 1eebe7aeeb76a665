"""Two ablation arms at once on one thread each, against one after the other on two threads, same run.

    .venv/bin/python benchmarks/bench_arms_at_once.py [--steps 300] [--images 400] [--held-out 100]

`sphinx-mllm demo ablations` trains its arms (after the main job's line) `ARMS_AT_ONCE` at a time in worker
processes of `ARM_THREADS` thread each. This measures that choice on the machine at hand. An arm here is what
one of the ablations' arms is, smaller: stage 2 (`recipe.task_stage`, the demo's batch, images and features
kept) of `--steps` from the miniature's pretrained parts on `--images` training images per domain, then
`recipe.score` of all four tasks on `--held-out` images per domain, each arm in a fresh process. Baseline: two
arms one after the other, each on two threads; against: two arms at once, each on one thread. Prints the wall
time of each way (process start included, as in the ablations) and their ratio.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def arm(root: Path, folder: str | None, steps: int, images: int, held_out: int):
    """One arm in this process: stage 2 then scoring, in `root/folder`; the data and the init, which the arms
    share, are made first (and only those without `folder`)."""
    from modeling_sphinx.miniature.recipe import (
        EVERY_TASK,
        FULL_BUDGET,
        data_splits,
        init_from_parts,
        score,
        task_stage,
    )

    budget = replace(FULL_BUDGET, train_images=images, task_steps=steps)
    train, evaluation = data_splits(root, budget, 0, held_out, 40_000_000)
    init = init_from_parts(root / "init", 0)
    if folder is None:
        return
    (root / folder).mkdir()
    model = task_stage(init, list(train.values()), root / folder / "stage2", budget, f"stage 2 ({folder})")
    score(model, evaluation, root / folder / "eval", f"eval ({folder})", EVERY_TASK)


def timed(commands: list[list[str]], at_once: bool) -> float:
    quiet = {**os.environ, "TQDM_DISABLE": "1"}  # two arms' progress bars on one console overwrite each other
    start = time.perf_counter()
    if at_once:
        for process in [subprocess.Popen(command, env=quiet) for command in commands]:
            if process.wait():
                raise SystemExit(f"an arm failed: {process.args}")
    else:
        for command in commands:
            subprocess.run(command, check=True, env=quiet)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=400, help="training images per domain")
    parser.add_argument("--held-out", type=int, default=100, help="held-out images per domain")
    parser.add_argument("--root", help=argparse.SUPPRESS)  # set: run one arm (or prepare) in this process
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.root:
        import torch

        torch.set_num_threads(args.threads)
        arm(Path(args.root), args.arm, args.steps, args.images, args.held_out)
        return
    sizes = ["--steps", str(args.steps), "--images", str(args.images), "--held-out", str(args.held_out)]
    with tempfile.TemporaryDirectory() as scratch:

        def command(folder: str, threads: int) -> list[str]:
            return [sys.executable, __file__, *sizes, "--root", scratch, "--arm", folder, "--threads", str(threads)]

        subprocess.run([sys.executable, __file__, *sizes, "--root", scratch], check=True)  # the shared data, init
        one_after_the_other = timed([command("two-threads-a", 2), command("two-threads-b", 2)], at_once=False)
        both_at_once = timed([command("one-thread-a", 1), command("one-thread-b", 1)], at_once=True)
    print(f"two arms, each {args.steps} steps then all four tasks on {args.held_out} held-out images per domain")
    print("| way | wall s | throughput against one after the other |")
    print("|---|---|---|")
    print(f"| one after the other, two threads each | {one_after_the_other:.1f} | 1.00x |")
    print(f"| both at once, one thread each | {both_at_once:.1f} | {one_after_the_other / both_at_once:.2f}x |")


if __name__ == "__main__":
    main()
