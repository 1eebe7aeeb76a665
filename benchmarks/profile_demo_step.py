"""Where a training step of the miniature demo spends its time: collation against the model, same run.

    .venv/bin/python benchmarks/profile_demo_step.py [--steps 10] [--batch 16]

One batch of the demo's stage-2 mixture (VQA, grounding, region captions on both domains) at a time, as TRL's
`SFTTrainer` runs it: `SphinxDataCollator` (TRL's vision collator: images opened and preprocessed, the chat
template rendered, tokenised and the assistant mask realigned over the expanded `<image>` tokens), then forward,
backward and an AdamW step of the miniature. The collation is timed three ways in the same run: as the demo runs
it (images kept decoded and preprocessed, the assistant mask compared as arrays), with the images kept decoded
only, and before both (transformers' per-token mask loop, every PNG decoded each batch). The collation is split
into its parts with cProfile; the model step into the view cutting (float16 resizes), the encoders, and the LLM,
and timed again with the frozen encoders' features kept between steps (`keep_frozen_features`, the demo's
`feature_cache_size`), then with TRL's fused LM head as `SFTTrainer` adds it, projecting every position (TRL's
way off Triton devices) against the labelled ones only (`labelled_positions_only`, what `train` does). Medians of
`--steps` after a warm-up.
"""

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import datasets
import torch
from transformers.processing_utils import ProcessorMixin
from trl.trainer.utils import add_fused_lm_head

from modeling_sphinx.inference import load_pretrained
from modeling_sphinx.miniature.pretrain import init_miniature
from modeling_sphinx.miniature.recipe import TASK_WEIGHTS, mixture_file, write_split
from modeling_sphinx.miniature.world import DOMAINS
from modeling_sphinx.training import sft
from modeling_sphinx.training.mixtures import load_mixture
from modeling_sphinx.training.sft import SphinxDataCollator, labelled_positions_only

transformers_mask_rule = ProcessorMixin._adjust_assistant_masks_indices


def median_seconds(function, steps: int) -> float:
    function()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        splits = [write_split(root / "data", domain, 1000, 64) for domain in DOMAINS]
        dataset = load_mixture(mixture_file(root / "stage2.yaml", splits, TASK_WEIGHTS))
        processor, model = load_pretrained(str(init_miniature(root / "init")), dtype="float32")
        collator = SphinxDataCollator(
            processor=processor, max_length=1024, assistant_only_loss=True, image_cache_size=len(dataset)
        )
        rows = [dataset[i] for i in range(args.batch)]
        collate = lambda: collator([dict(row) for row in rows])  # noqa: E731 (the collator consumes its rows)
        batch = collate()
        before = SphinxDataCollator(processor=processor, max_length=1024, assistant_only_loss=True)

        def collate_before():
            with patch.object(type(processor), "_adjust_assistant_masks_indices", transformers_mask_rule):
                before([dict(row) for row in rows])

        decoded_only = SphinxDataCollator(
            processor=processor, max_length=1024, assistant_only_loss=True, image_cache_size=len(dataset)
        )

        def collate_decoded_only():
            with patch.object(sft, "_KeptPixels", lambda image_processor, pixels: image_processor):
                decoded_only([dict(row) for row in rows])

        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def train_step():
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()

        sphinx = model.model
        pixels = batch["pixel_values"]

        def encoders():
            with torch.no_grad():
                sphinx.get_image_features(pixels)

        def views():
            with torch.no_grad():
                sphinx.cut_views(pixels)

        timings = {
            "collation before (transformers' mask loop, every PNG decoded)": median_seconds(
                collate_before, args.steps
            ),
            "collation, images kept decoded only": median_seconds(collate_decoded_only, args.steps),
            "collation": median_seconds(collate, args.steps),
            "model step (forward, backward, AdamW)": median_seconds(train_step, args.steps),
            "  of which view cutting (float16 resizes)": median_seconds(views, args.steps),
            "  of which view cutting + encoders (no grad)": median_seconds(encoders, args.steps),
        }
        model.keep_frozen_features(len(dataset))  # as the demo trains: each image's features computed once
        timings["model step, frozen encoders' features kept"] = median_seconds(train_step, args.steps)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer computes

        def fused_step():
            optimizer.zero_grad()
            model(**batch, fused_lm_head=True).loss.backward()
            optimizer.step()

        timings["  the same with TRL's fused LM head over every position"] = median_seconds(fused_step, args.steps)
        with labelled_positions_only():
            timings["  the same over the labelled positions only"] = median_seconds(fused_step, args.steps)
        model.keep_frozen_features(0)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.steps):
            collate()
        profile.disable()
    tokens = batch["input_ids"].shape[1]
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    print(
        f"batch {args.batch} x {tokens} tokens ({model.config.num_image_tokens} visual, {labelled} labelled), "
        f"{args.threads} threads"
    )
    print("| part | median ms |")
    print("|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds * 1000:.1f} |")
    print("\ncollation, cumulative time per call of its largest parts:")
    stats = pstats.Stats(profile)
    stats.sort_stats("cumulative").print_stats(18)


if __name__ == "__main__":
    main()
