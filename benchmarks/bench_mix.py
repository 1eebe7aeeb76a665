"""Mixing speed and memory against mergekit 0.1.5 on the same recipes, same run.

    .venv/bin/pip install -e ".[bench]" && .venv/bin/python benchmarks/bench_mix.py [--work DIR]

Two checkpoints of a ~850M-parameter LLaMA (width 2048, 14 layers; bfloat16, ~1.7 GB, ~500 MB shards) are
written twice: as text-only LLaMA folders for mergekit and as SPHINX folders (the same LLM plus tiny encoders)
for `sphinx-mllm mix`. Each method runs in a fresh process; peak RSS is that process's. The TIES outputs are
compared with an exact float32 TIES. Figures are recorded in benchmarks/README.md.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from transformers import LlamaConfig

from modeling_sphinx.folder.create import init_model
from modeling_sphinx.folder.shards import LazyCheckpoint

TEXT = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 14,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 4096,
}
MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, capture_output=True)\n"
    "print(json.dumps({'seconds': time.perf_counter() - start,"
    " 'peak_rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
)
RECIPES = {
    "linear": lambda a, b, base: {
        "merge_method": "linear",
        "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    "slerp": lambda a, b, base: {
        "merge_method": "slerp",
        "base_model": a,
        "models": [{"model": a}, {"model": b}],
        "parameters": {"t": 0.5},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    "ties": lambda a, b, base: {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
}


def write_llm(
    folder: Path, seed: int, vocab: int, extra: dict | None = None, prefix: str = "", head: str = "lm_head.weight"
):
    """Random bfloat16 LLaMA tensors in ~500 MB shards (plus `extra` tensors), named with `prefix`."""
    h, f = TEXT["hidden_size"], TEXT["intermediate_size"]
    shapes = {f"{prefix}embed_tokens.weight": (vocab, h), f"{prefix}norm.weight": (h,), head: (vocab, h)}
    for i in range(TEXT["num_hidden_layers"]):
        layer = f"{prefix}layers.{i}."
        shapes.update(
            {
                layer + n: (h, h)
                for n in (
                    "self_attn.q_proj.weight",
                    "self_attn.k_proj.weight",
                    "self_attn.v_proj.weight",
                    "self_attn.o_proj.weight",
                )
            }
        )
        shapes.update(
            {
                layer + "mlp.gate_proj.weight": (f, h),
                layer + "mlp.up_proj.weight": (f, h),
                layer + "mlp.down_proj.weight": (h, f),
                layer + "input_layernorm.weight": (h,),
                layer + "post_attention_layernorm.weight": (h,),
            }
        )
    tensors = {}
    for key, shape in shapes.items():  # seeded per tensor name, so both layouts hold the same LLM tensors
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key.removeprefix(prefix)}".encode()))
        tensors[key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    tensors.update(extra or {})
    shards, current, size = [], {}, 0
    for key, tensor in tensors.items():
        if current and size + tensor.numel() * 2 > 500 * 2**20:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += tensor.numel() * tensor.element_size()
    shards.append(current)
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def make_inputs(work: Path):
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        llama = work / f"llama-{name}"
        if not llama.exists():
            llama.mkdir(parents=True)
            config = LlamaConfig(**TEXT, vocab_size=32000, dtype="bfloat16", architectures=["LlamaForCausalLM"])
            config.save_pretrained(llama)
            write_llm(llama, seed, 32000, prefix="model.")
        sphinx = work / f"sphinx-{name}"
        if not sphinx.exists():
            tiny = init_model("sphinx-1k", work / f"tiny-{name}", tiny=True, seed=seed, text_config=dict(TEXT))
            vision = {
                k: v.to(torch.bfloat16)
                for k, v in ((k, LazyCheckpoint(tiny).get(k)) for k in LazyCheckpoint(tiny).tensor_names())
                if not k.startswith(("model.language_model.", "lm_head."))
            }
            shutil.copytree(tiny, sphinx, ignore=shutil.ignore_patterns("*.safetensors*"))
            write_llm(
                sphinx,
                seed,
                len(json.loads((tiny / "tokenizer.json").read_text())["model"]["vocab"]) + 1,
                extra=vision,
                prefix="model.language_model.",
            )
            shutil.rmtree(tiny)


def exact_ties(base, models, weights, density):
    """TIES by its definition with a full sort (slow, exact): the reference both tools are compared with."""
    deltas = []
    for model in models:
        delta = model - base
        k = int(density * delta.numel())
        threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
        deltas.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    stacked = torch.stack(deltas)
    w = torch.tensor(weights).view(-1, *[1] * base.ndim)
    agree = (torch.sign(stacked) == torch.sign((w * stacked).sum(0))).float()
    divisor = (w * agree).sum(0)
    divisor[divisor.abs() < 1e-8] = 1
    return base + (w * stacked * agree).sum(0) / divisor


def measure(command: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=None)
    parser.add_argument("--methods", default="linear,slerp,ties")
    parser.add_argument(
        "--entry",
        choices=["command", "package"],
        default="command",
        help="run `sphinx-mllm` (command) or `python -m modeling_sphinx.cli`, which imports the whole package "
        "first as the command did before its launcher (package)",
    )
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sphinx-mix-bench-"))
    make_inputs(work)
    bin_dir = Path(sys.executable).parent
    rows = []
    for method in args.methods.split(","):
        results = {}
        for tool, prefix in (("mergekit", "llama"), ("sphinx-mllm", "sphinx")):
            recipe = RECIPES[method](*(str(work / f"{prefix}-{n}") for n in ("a", "b", "base")))
            out = work / f"out-{tool}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            path = work / f"{tool}-{method}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            if tool == "mergekit":
                command = [
                    str(bin_dir / "mergekit-yaml"),
                    str(path),
                    str(out),
                    "--out-shard-size",
                    "500M",
                    "--no-copy-tokenizer",
                ]
            else:
                entry = [str(bin_dir / "sphinx-mllm")]
                if args.entry == "package":
                    entry = [sys.executable, "-m", "modeling_sphinx.cli"]
                command = [*entry, "mix", str(path), str(out), "--max-shard-size", "500MB"]
            results[tool] = measure(command)
        m, s = results["mergekit"], results["sphinx-mllm"]
        rows.append((method, m, s))
        print(
            f"{method:7s} mergekit {m['seconds']:7.1f} s {m['peak_rss_kb'] / 2**20:5.2f} GiB | sphinx-mllm "
            f"{s['seconds']:7.1f} s {s['peak_rss_kb'] / 2**20:5.2f} GiB | time ratio {s['seconds'] / m['seconds']:.2f}, "
            f"speed-up {m['seconds'] / s['seconds']:.1f}x",
            flush=True,
        )
    if "ties" in args.methods:
        key = "layers.3.mlp.up_proj.weight"
        inputs = [LazyCheckpoint(work / f"llama-{n}").get("model." + key).float() for n in ("base", "a", "b")]
        exact = exact_ties(inputs[0], inputs[1:], [0.5, 0.5], 0.5).to(torch.bfloat16)
        ours = LazyCheckpoint(work / "out-sphinx-mllm-ties").get("model.language_model." + key)
        theirs = LazyCheckpoint(work / "out-mergekit-ties").get("model." + key)
        for tool, result in (("sphinx-mllm", ours), ("mergekit", theirs)):
            print(
                f"ties {key}: {tool} differs from exact float32 TIES on {(result != exact).float().mean():.3%} of elements"
            )


if __name__ == "__main__":
    main()
