"""`sphinx-mllm extract-lora`: a PEFT adapter of a fine-tune's difference from its base, loaded with
`PeftModel.from_pretrained` and compared with the fine-tune's logits."""

import json
import re
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from modeling_sphinx.cli import main
from modeling_sphinx.folder.create import init_model
from modeling_sphinx.mixing.extract_lora import ExtractionError, extract_lora

# wider than the tiny preset, so that rank 64 truncates: q/k/v/o are 96 x 96, the MLP 96 x 192
TEXT = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4}
RANKS = (2, 8, 32, 64, 96)


def fine_tune(folder, out, steps=30):
    """A full fine-tune of the LLM on a fixed random text batch (AdamW), saved as a model folder."""
    model = AutoModelForImageTextToText.from_pretrained(folder)
    model.train()
    optimizer = torch.optim.AdamW(model.model.language_model.parameters(), lr=3e-3)
    tokens = torch.randint(3, 500, (4, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(out)
    for extra in folder.iterdir():
        if extra.suffix in (".json", ".jinja", ".py") and not (out / extra.name).exists():
            (out / extra.name).write_bytes(extra.read_bytes())
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = init_model("sphinx", root / "base", tiny=True, seed=0, text_config=TEXT)
    return base, fine_tune(base, root / "tuned")


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def adapter_error(base, tuned_logits, adapter, tokens) -> float:
    """‖logits(base + adapter) − logits(tuned)‖ / ‖logits(tuned) − logits(base)‖."""
    model = AutoModelForImageTextToText.from_pretrained(base)
    base_logits = logits(model, tokens)
    adapted = PeftModel.from_pretrained(model, adapter).eval()
    return float((logits(adapted, tokens) - tuned_logits).norm() / (tuned_logits - base_logits).norm())


def test_the_adapter_reproduces_the_fine_tune_and_its_error_falls_with_the_rank(pair, tmp_path, capsys):
    base, tuned = pair
    tokens = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    tuned_logits = logits(AutoModelForImageTextToText.from_pretrained(tuned), tokens)
    errors, energies = [], []
    for rank in RANKS:
        out = tmp_path / f"rank{rank}"
        assert main(["extract-lora", str(base), str(tuned), str(out), "--rank", str(rank)]) == 0
        printed = capsys.readouterr().out
        assert f"extracted 14 layers at rank {rank}" in printed and "kept energy" in printed
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == min(rank, 96) == config["lora_alpha"]
        assert "model.language_model.embed_tokens" in config["modules_to_save"]
        errors.append(adapter_error(base, tuned_logits, out, tokens))
        energies.append(float(printed.split("kept energy ")[-1].split()[0]))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert all(later > earlier for earlier, later in zip(energies[:-2], energies[1:-1], strict=False)), energies
    # measured 2026-12-07: 1.03, 0.78, 0.41, 0.15 and 1e-6 of the fine-tune's own change (docs/mixing.md)
    assert errors[RANKS.index(64)] < 0.25
    assert errors[-1] < 1e-4 and energies[-1] == pytest.approx(1.0)  # full rank: the fine-tune itself


def test_the_summary_reports_each_layer_and_what_is_left_out(pair, tmp_path):
    base, tuned = pair
    summary = extract_lora(base, tuned, tmp_path / "out", rank=4)
    assert len(summary["layers"]) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(layer["rank"] == 4 and 0 < layer["kept_energy"] < 1 for layer in summary["layers"].values())
    assert summary["not_carried"] == {}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: peft" in card and "rank 4" in card


def norms_only(base, tmp_path):
    """A copy of `base` whose final norm alone differs."""
    tuned = tmp_path / "norms-only"
    shutil.copytree(base, tuned)
    weights = load_file(tuned / "model.safetensors")
    weights["model.language_model.norm.weight"] += 0.5
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    return tuned


def test_bad_inputs_are_one_line_and_exit_2(pair, tmp_path, capsys):
    base, tuned = pair
    other = init_model("sphinx", tmp_path / "other", tiny=True)  # the tiny preset: another width
    cases = [
        ([str(base), str(tmp_path / "missing"), str(tmp_path / "a")], "tuned model folder .* does not exist"),
        ([str(base), str(other), str(tmp_path / "b")], "has shape .* in the tuned model .* but .* in the base"),
        (
            [str(base), str(base), str(tmp_path / "c")],
            r"leaves no LLM linear layer to extract .*\(no tensor differs\)",
        ),
        ([str(base), str(norms_only(base, tmp_path)), str(tmp_path / "e")], r"only \['model.language_model.norm'\]"),
        ([str(base), str(tuned), str(tmp_path / "d"), "--rank", "0"], "--rank"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert main(["extract-lora", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert re.search(message, err), err
    assert not any(path.name in "abcde" for path in tmp_path.iterdir())
    with pytest.raises(ExtractionError, match="model_type is 'llama', not 'sphinx'"):
        (tmp_path / "llama").mkdir()
        (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
        extract_lora(base, tmp_path / "llama", tmp_path / "e")
