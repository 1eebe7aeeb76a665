"""Tensor parallelism with transformers' own plan: `recipes/tensor_parallel/tp_generate.py` under torchrun,
two gloo processes on CPU, gives the logits and greedy ids of one process, with the LLM really sharded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from .helpers import IMAGES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is it?"


def _one_process(folder: Path, image: Path, max_new_tokens: int) -> dict:
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=Image.open(image).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return {"logits": logits, "ids": ids[0, inputs["input_ids"].shape[1] :], "model": model}


@pytest.mark.parametrize("variant", ["sphinx-1k", "sphinx-tiny", "sphinx-moe"])  # llama, llama-light, mixtral
def test_two_tensor_parallel_processes_match_one(variant, tiny_model_dir, tmp_path):
    folder, image = tiny_model_dir(variant), IMAGES / "chelsea.png"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               str(REPO / "recipes" / "tensor_parallel" / "tp_generate.py"), str(folder), "--image", str(image),
               "--question", QUESTION, "--max-new-tokens", "6", "--dump", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    alone = _one_process(folder, image, 6)
    plan = alone["model"].tp_plan  # the LLM's own plan under the wrapper's prefix; the encoders stay whole
    assert "model.language_model.layers.*.self_attn.q_proj" in plan and "lm_head" in plan
    assert all(name.startswith(("model.language_model.", "lm_head")) for name in plan), plan
    rows = alone["model"].model.language_model.layers[0].self_attn.q_proj.weight.shape
    for rank in (0, 1):
        sharded = torch.load(tmp_path / f"out.rank{rank}")
        assert sharded["tp_size"] == 2 and sharded["q_proj"] == (rows[0] // 2, rows[1])  # half the heads each
        assert torch.allclose(sharded["logits"], alone["logits"], atol=1e-5), (
            (sharded["logits"] - alone["logits"]).abs().max()
        )
        assert sharded["ids"].tolist() == alone["ids"].tolist()
    assert "Warning" not in run.stderr, run.stderr[-2000:]
