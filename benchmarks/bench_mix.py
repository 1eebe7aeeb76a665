"""Mixing speed and memory against mergekit 0.1.5 on the same recipes, same run.

    .venv/bin/pip install -e ".[bench]" && .venv/bin/python benchmarks/bench_mix.py [--work DIR]
    .venv/bin/python benchmarks/bench_mix.py --tiny --input-dtype float32 --out-dtype float32 --reference

Two checkpoints of a ~850M-parameter LLaMA (width 2048, 14 layers; bfloat16, ~1.7 GB, ~500 MB shards) and their
base are written twice: as text-only LLaMA folders for mergekit and as SPHINX folders (the same LLM plus tiny
encoders) for `sphinx-mllm mix`. Each method runs in a fresh process; peak RSS is that process's (the first
command: speed and memory). Every method's output is compared with mergekit's, tensor by tensor (the methods that
draw random masks at density 1, where they draw nothing), and the TIES outputs with an exact float32 TIES. The
second command compares the methods' arithmetic: a 2-layer, 256-wide LLM in float32 (no ties between magnitudes
for the two tools to break differently) and float32 outputs, with a float64 mix as the reference wherever the two
differ. Figures are recorded in benchmarks/README.md; `--methods` picks some (default: all of mergekit's
single-architecture methods), and a method named again runs again, its median ratio printed at the end.
"""

import argparse
import json
import os
import shutil
import statistics
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
from modeling_sphinx.mixing import METHODS, BaseRole

TEXT = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 14,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 4096,
}
# the inputs' and the outputs' dtypes: bfloat16 as released models; float32 to compare the methods' arithmetic
INPUT = {"dtype": torch.bfloat16, "out_dtype": "bfloat16"}
MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, capture_output=True)\n"
    "print(json.dumps({'seconds': time.perf_counter() - start,"
    " 'peak_rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
)
# each method's parameters in the benchmark's recipes (the methods' defaults for the rest)
PARAMETERS = {
    "linear": {"weight": 0.5},
    "slerp": {"t": 0.5},
    "nuslerp": {"weight": 0.5},
    "multislerp": {"weight": 0.5},
    "karcher": {},
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 0.5, "density": 0.5},
    "dare_ties": {"weight": 0.5, "density": 0.5},
    "dare_linear": {"weight": 0.5, "density": 0.5},
    "breadcrumbs": {"weight": 0.5, "density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"weight": 0.5, "density": 0.9, "gamma": 0.01},
    "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
    "della_linear": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
    "sce": {"select_topk": 0.5},
    "ram": {},
    "ramplus_tl": {},
    "model_stock": {},
    "nearswap": {"t": 0.01},
    "arcee_fusion": {},
    "passthrough": {"scale": 0.5},
}


def recipe(method: str, a: str, b: str, base: str, density: float | None = None) -> dict:
    """The same recipe for both tools: the base as origin where the method has one, a and b as the models (a alone
    where the method takes one model), `density` in place of the table's where given."""
    spec = METHODS[method]
    parameters = dict(PARAMETERS[method])
    if density is not None and "density" in parameters:
        parameters["density"] = density
    models = [a] if spec.max_models == 1 else [a, b]
    if method == "slerp":  # mergekit's slerp lists the base as one of its two models
        models = [base, a]
    written = {"merge_method": method, "models": [{"model": m} for m in models], "parameters": parameters}
    if spec.base_role is not BaseRole.LISTED_MODEL:
        written["base_model"] = base
    return written | {"dtype": "float32", "out_dtype": INPUT["out_dtype"]}


def write_llm(
    folder: Path, seed: int, vocab: int, extra: dict | None = None, prefix: str = "", head: str = "lm_head.weight"
):
    """Random LLaMA tensors of `INPUT["dtype"]` in ~500 MB shards (plus `extra` tensors), named with `prefix`."""
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
        tensors[key] = (torch.randn(shape, generator=generator) * 0.02).to(INPUT["dtype"])
    tensors.update(extra or {})
    shards, current, size = [], {}, 0
    for key, tensor in tensors.items():
        if current and size + tensor.numel() * tensor.element_size() > 500 * 2**20:
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
            dtype = str(INPUT["dtype"]).removeprefix("torch.")
            config = LlamaConfig(**TEXT, vocab_size=32000, dtype=dtype, architectures=["LlamaForCausalLM"])
            config.save_pretrained(llama)
            write_llm(llama, seed, 32000, prefix="model.")
        sphinx = work / f"sphinx-{name}"
        if not sphinx.exists():
            tiny = init_model("sphinx-1k", work / f"tiny-{name}", tiny=True, seed=seed, text_config=dict(TEXT))
            vision = {
                k: v.to(INPUT["dtype"])
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
    os.sync()  # the last run's output flushed first: no run pays for another's writeback to disk
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(ours: Path, theirs: Path, llama: bool = True) -> dict:
    """Every LLM tensor of the two outputs but the embeddings (the SPHINX folders have the tiny tokenizer's
    vocabulary): the share of elements that differ, and the largest difference relative to its tensor's largest
    entry (float32 rounding of a few operations: ~1e-7). `theirs` is a text-only LLaMA folder, or with `llama`
    false a SPHINX folder like `ours`."""
    ours, theirs = LazyCheckpoint(ours), LazyCheckpoint(theirs)
    differing, total, worst = 0, 0, 0.0
    for name in theirs.tensor_names():
        if "embed_tokens" in name or name == "lm_head.weight" or (not llama and "language_model" not in name):
            continue
        mapped = name.replace("model.", "model.language_model.", 1) if llama else name
        a, b = ours.get(mapped).to(torch.float32), theirs.get(name).to(torch.float32)
        differing += int((a != b).sum())
        total += a.numel()
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
    return {"differing": differing / total, "max_relative": worst}


RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}  # compared at density 1, where nothing is drawn


def run_tool(tool: str, work: Path, written: dict, tag: str, entry: list[str]) -> tuple[dict, Path]:
    out = work / f"out-{tool}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    path = work / f"{tool}-{tag}.yaml"
    path.write_text(yaml.safe_dump(written))
    if tool == "mergekit":
        bin_dir = Path(sys.executable).parent
        command = [
            str(bin_dir / "mergekit-yaml"),
            str(path),
            str(out),
            "--out-shard-size",
            "500M",
            "--no-copy-tokenizer",
        ]
    else:
        command = [*entry, "mix", str(path), str(out), "--max-shard-size", "500MB"]
    return measure(command), out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=None)
    parser.add_argument("--methods", default=",".join(PARAMETERS), help="comma-separated (default: all)")
    parser.add_argument(
        "--entry",
        choices=["command", "package"],
        default="command",
        help="run `sphinx-mllm` (command) or `python -m modeling_sphinx.cli`, which imports the whole package "
        "first as the command did before its launcher (package)",
    )
    parser.add_argument("--input-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--reference", action="store_true", help="where the outputs differ, also mix in float64")
    parser.add_argument("--layers", type=int, default=TEXT["num_hidden_layers"], help="the LLM's depth")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 256-wide LLM: a dry run of the script")
    args = parser.parse_args()
    INPUT.update(dtype=getattr(torch, args.input_dtype), out_dtype=args.out_dtype)
    TEXT["num_hidden_layers"] = args.layers
    if args.tiny:
        TEXT.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
        TEXT.update(num_key_value_heads=4)
    work = Path(args.work or tempfile.mkdtemp(prefix="sphinx-mix-bench-"))
    make_inputs(work)
    entry = [str(Path(sys.executable).parent / "sphinx-mllm")]
    if args.entry == "package":
        entry = [sys.executable, "-m", "modeling_sphinx.cli"]
    rows = []
    tools = (("mergekit", "llama"), ("sphinx-mllm", "sphinx"))
    for method in args.methods.split(","):
        results, outputs = {}, {}
        # the second run of a pair is slowed by the first's disk traffic (even flushed): a method run again
        # starts with the other tool
        first_again = sum(row["method"] == method for row in rows) % 2
        for tool, prefix in tools[::-1] if first_again else tools:
            paths = [str(work / f"{prefix}-{n}") for n in ("a", "b", "base")]
            results[tool], outputs[tool] = run_tool(tool, work, recipe(method, *paths), method, entry)
        if method in RANDOM:  # the timed run drew its masks with each tool's own generator: compare at density 1
            for tool, prefix in tools:
                paths = [str(work / f"{prefix}-{n}") for n in ("a", "b", "base")]
                shutil.rmtree(outputs[tool])
                _, outputs[tool] = run_tool(tool, work, recipe(method, *paths, density=1.0), method, entry)
        if method == "ties":
            exact_ties_check(work, outputs)
        equal = compare(outputs["sphinx-mllm"], outputs["mergekit"])
        if args.reference and equal["differing"]:  # which is nearer the float64 mix (tested against definitions)
            paths = [str(work / f"sphinx-{n}") for n in ("a", "b", "base")]
            written = recipe(method, *paths, density=1.0 if method in RANDOM else None) | {"dtype": "float64"}
            _, reference = run_tool("sphinx-mllm", work, written, f"{method}-float64", entry)
            for tool in outputs:
                nearness = compare(reference, outputs[tool], llama=tool == "mergekit")
                equal[f"{tool} vs float64"] = nearness["max_relative"]
            shutil.rmtree(reference)
        for out in outputs.values():
            shutil.rmtree(out)
        m, s = results["mergekit"], results["sphinx-mllm"]
        row = {
            "method": method,
            "mergekit_s": m["seconds"],
            "mergekit_gib": m["peak_rss_kb"] / 2**20,
            "sphinx_s": s["seconds"],
            "sphinx_gib": s["peak_rss_kb"] / 2**20,
            **equal,
        }
        rows.append(row)
        print(
            f"| {method} | {row['mergekit_s']:.1f} s, {row['mergekit_gib']:.2f} GiB | {row['sphinx_s']:.1f} s, "
            f"{row['sphinx_gib']:.2f} GiB | {row['sphinx_s'] / row['mergekit_s']:.2f} | "
            f"{row['sphinx_gib'] / row['mergekit_gib']:.2f} | {row['differing']:.3%}, {row['max_relative']:.1e}"
            + (" (density 1)" if method in RANDOM else "")
            + "".join(f"; {key} {value:.1e}" for key, value in equal.items() if key.endswith("float64"))
            + " |",
            flush=True,
        )
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print_medians(rows)


def print_medians(rows: list[dict]):
    """For each method run more than once (named again in `--methods`): the median of its time and peak-memory
    ratios, and the range of its time ratio. Each run's ratio pairs the two tools' consecutive runs, so the median
    over rounds is the figure least moved by the machine's run-to-run noise."""
    rounds = {}
    for row in rows:
        rounds.setdefault(row["method"], []).append(row)
    repeated = {method: runs for method, runs in rounds.items() if len(runs) > 1}
    if not repeated:
        return
    print("| method | runs | median time ratio (range) | median peak RSS ratio |")
    print("|---|---|---|---|")
    for method, runs in repeated.items():
        times = [run["sphinx_s"] / run["mergekit_s"] for run in runs]
        memory = [run["sphinx_gib"] / run["mergekit_gib"] for run in runs]
        print(
            f"| {method} | {len(runs)} | {statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f}) | "
            f"{statistics.median(memory):.2f} |"
        )


def exact_ties_check(work: Path, outputs: dict):
    key = f"layers.{min(3, TEXT['num_hidden_layers'] - 1)}.mlp.up_proj.weight"
    inputs = [LazyCheckpoint(work / f"llama-{n}").get("model." + key).float() for n in ("base", "a", "b")]
    exact = exact_ties(inputs[0], inputs[1:], [0.5, 0.5], 0.5)
    ours = LazyCheckpoint(outputs["sphinx-mllm"]).get("model.language_model." + key)
    theirs = LazyCheckpoint(outputs["mergekit"]).get("model." + key).float()
    exact = exact.to(ours.dtype).float()  # rounded as both outputs are
    for tool, result in (("sphinx-mllm", ours.float()), ("mergekit", theirs)):
        print(
            f"ties {key}: {tool} differs from exact float32 TIES on {(result != exact).float().mean():.3%} of elements"
        )


if __name__ == "__main__":
    main()
