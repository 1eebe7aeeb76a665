"""Conversion cost: wall time and peak RSS against the size of the largest input shard.

    .venv/bin/python benchmarks/bench_convert.py [--layers 12] [--shards 2] [--work DIR]

Writes a synthetic original-format SPHINX-1k checkpoint (LLaMA of width 2048, tiny encoders, float32, the
given number of tensor-parallel shards) and converts it to bfloat16 with 500 MB output shards in a fresh
process, so the process's peak RSS is the converter's alone. Figures are recorded in benchmarks/README.md.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration
from modeling_sphinx.folder.convert import write_original_checkpoint
from modeling_sphinx.folder.tokenizer import train_tiny_sentencepiece

CONVERT = """
import json, resource, sys, time
from modeling_sphinx.folder.convert import convert_checkpoint
start = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], dtype="bfloat16", max_shard_size="500MB", encoder_sizes=json.loads(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sphinx-convert-bench-"))
    original, out = work / "original", work / "hf"
    shutil.rmtree(out, ignore_errors=True)
    if not original.exists():
        text = {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": args.layers,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "vocab_size": 513,
        }
        config = SphinxConfig.from_variant("sphinx-1k", tiny=True, text_config=text)
        model = SphinxForConditionalGeneration(config)
        write_original_checkpoint(model, original, num_shards=args.shards)
        (original / "tokenizer.model").write_bytes(train_tiny_sentencepiece())
        del model
    sizes = {
        "clip_ViT-L-14": {"vision_cfg": {"width": 32, "layers": 1, "head_width": 16}},
        "timm_convnext_xxlarge": {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]},
        "dinov2_vit_giant2": {"embed_dim": 24, "depth": 1, "num_heads": 2},
        "blip2": {
            "vision": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1},
            "qformer": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 2,
                "num_hidden_layers": 2,
                "encoder_hidden_size": 32,
            },
        },
    }
    shard_sizes = [p.stat().st_size for p in original.glob("consolidated.*.pth")]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CONVERT, str(original), str(out), json.dumps(sizes)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    peak = measured["peak_rss_kb"] * 1024
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(
        f"input: {len(shard_sizes)} shards, {sum(shard_sizes) / 2**30:.2f} GiB float32, largest {max(shard_sizes) / 2**30:.2f} GiB"
    )
    print(f"output: {written / 2**30:.2f} GiB bfloat16 in {len(list(out.glob('*.safetensors')))} files")
    print(
        f"convert: {measured['seconds']:.1f} s (process wall {wall:.1f} s), peak RSS {peak / 2**30:.2f} GiB "
        f"= {peak / max(shard_sizes):.2f}x the largest shard"
    )


if __name__ == "__main__":
    main()
