import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration
from modeling_sphinx.cli import main
from modeling_sphinx.folder.convert import (
    ConversionError,
    convert_checkpoint,
    resize_dinov2_pos_embed,
    write_original_checkpoint,
)
from modeling_sphinx.folder.tokenizer import train_tiny_sentencepiece

from .helpers import PARITY

FIXTURES = ["llama_ens", "llama_ens5", "llama_ens5_light"]
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each parity fixture converted once through the CLI, float32, with its encoder sizes."""
    folders = {}
    for name in FIXTURES:
        root = tmp_path_factory.mktemp(name)
        sizes = root / "sizes.json"
        manifest = json.loads((PARITY / name / "manifest.json").read_text())
        sizes.write_text(json.dumps(manifest["size_changes_vs_real_model"]))
        out = root / "hf"
        args = ["convert", str(PARITY / name / "checkpoint"), str(out), "--dtype", "float32", "--verify"]
        assert main(args + ["--encoder-sizes", str(sizes)]) == 0
        folders[name] = (out, manifest)
    return folders


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("image", ["astronaut", "chelsea_crop"])
def test_converted_model_reproduces_original(converted, fixture, image):
    folder, manifest = converted[fixture]
    reference = load_file(PARITY / fixture / f"reference_{image}.safetensors")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    config = model.config
    assert config.num_image_tokens == manifest["model_geometry"]["image_words"]
    pixels = reference.get("pixel_values")
    if pixels is None:  # rebuilt bit-exactly as the fixture README says
        uint8 = reference["pixel_values_uint8"].permute(2, 0, 1).float()
        pixels = ((uint8 / 255 - CLIP_MEAN) / CLIP_STD)[None]
    full = _with_image_tokens(reference["input_ids"], config)
    logits = _text_logits(model, full, pixels, reference)
    assert (logits - reference["logits_forward"][0]).abs().max() <= 1e-4

    generated = model.generate(
        input_ids=full,
        pixel_values=pixels,
        attention_mask=torch.ones_like(full),
        max_new_tokens=len(reference["generated_ids"]),
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert generated.sequences[0, full.shape[1] :].tolist() == reference["generated_ids"].tolist()
    vocab = reference["logits_forward"].shape[-1]
    step_logits = torch.stack([step[0, :vocab] for step in generated.logits])
    assert (step_logits - reference["generate_step_logits"]).abs().max() <= 1e-4


WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def _non_weight_files(folder) -> set[str]:
    return {path.name for path in folder.iterdir() if not WEIGHT_FILE.fullmatch(path.name)}


def test_converted_and_initialised_folders_have_the_same_files(converted, tiny_model_dir):
    converted_folder, _ = converted["llama_ens5"]
    initialised_folder = tiny_model_dir("sphinx-1k")
    files = _non_weight_files(converted_folder)
    assert files == _non_weight_files(initialised_folder)
    assert {"config.json", "generation_config.json", "processor_config.json", "README.md"} <= files
    assert {"configuration_sphinx.py", "modeling_sphinx.py", "processing_sphinx.py"} <= files
    configs = [json.loads((folder / "config.json").read_text()) for folder in (converted_folder, initialised_folder)]
    assert configs[0]["auto_map"] == configs[1]["auto_map"] and len(configs[0]["auto_map"]) == 3
    assert configs[0]["architectures"] == configs[1]["architectures"] == ["SphinxForConditionalGeneration"]
    card = (converted_folder / "README.md").read_text()  # the parity fixtures are miniatures of their release
    assert "\n# hf\n" in card and "reduced-size model with the architecture of `sphinx-1k`" in card


def _with_image_tokens(ids, config):
    """The recorded text ids with the image's placeholder tokens after BOS, where the processor puts them."""
    placeholders = torch.full((1, config.num_image_tokens), config.image_token_id)
    return torch.cat([ids[:, :1], placeholders, ids[:, 1:]], dim=1)


def _text_logits(model, input_ids, pixels, reference):
    """The logits over the text positions and the original's vocabulary, as recorded."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixels).logits
    return logits[0, model.config.num_image_tokens :, : reference["logits_forward"].shape[-1]]


def _fixture_messages(fixture, manifest, image):
    path = PARITY / fixture / "inputs" / f"{image}.png"
    question = manifest["inputs"][image]["question"]
    return [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": question}]}]


def _recorded_pixels(reference):
    uint8 = reference["pixel_values_uint8"].permute(2, 0, 1).float()
    return reference.get("pixel_values", ((uint8 / 255 - CLIP_MEAN) / CLIP_STD)[None])


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("backend", [None, "torchvision", "pil"])
def test_processor_reproduces_recorded_inputs(converted, fixture, backend):
    """The default processor and both named backends give the original's pixels bit for bit and its ids,
    whether the prompt is tokenised by `apply_chat_template` or rendered first and passed to the processor."""
    folder, manifest = converted[fixture]
    processor = AutoProcessor.from_pretrained(folder, **({"backend": backend} if backend else {}))
    assert type(processor.image_processor).__name__ == (
        "SphinxImageProcessorPil" if backend == "pil" else "SphinxImageProcessor"
    )
    for image in ("astronaut", "chelsea_crop"):
        reference = load_file(PARITY / fixture / f"reference_{image}.safetensors")
        messages = _fixture_messages(fixture, manifest, image)
        one_step = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        two_step = processor(
            text=prompt, images=Image.open(PARITY / fixture / "inputs" / f"{image}.png"), return_tensors="pt"
        )
        for inputs in (one_step, two_step):
            assert torch.equal(inputs["pixel_values"], _recorded_pixels(reference))
            text_ids = [i for i in inputs["input_ids"][0].tolist() if i != processor.image_token_id]
            assert text_ids == reference["input_ids"][0].tolist()


REMOTE_DEFAULT_PATH = """
import hashlib, json, sys
sys.modules["modeling_sphinx"] = None  # the package is not installed for this user
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

torch.set_num_threads(2)  # as in the suite's own process, so both paths run the same kernels
folder, parity, fixture, questions, out = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
logits_by_key = {}
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
report = {}
for backend in (None, "pil"):
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True, **({"backend": backend} if backend else {}))
    for image, question in questions.items():
        path = f"{parity}/{fixture}/inputs/{image}.png"
        reference = load_file(f"{parity}/{fixture}/reference_{image}.safetensors")
        messages = [{"role": "user", "content": [{"type": "image", "path": path}, {"type": "text", "text": question}]}]
        one_step = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        two_step = processor(text=prompt, images=Image.open(path), return_tensors="pt")
        for pattern, inputs in (("one-step", one_step), ("two-step", two_step)):
            n = model.config.num_image_tokens
            vocab = reference["logits_forward"].shape[-1]
            with torch.no_grad():
                logits = model(**inputs).logits[0, n:, :vocab]
            key = f"{backend or 'default'}/{image}/{pattern}"
            logits_by_key[key] = logits.contiguous()
            report[key] = {
                "class": type(processor.image_processor).__name__,
                "ids": [i for i in inputs["input_ids"][0].tolist() if i != processor.image_token_id],
                "pixels": hashlib.sha256(inputs["pixel_values"].numpy().tobytes()).hexdigest(),
            }
save_file(logits_by_key, out)
print(json.dumps(report))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fixture", FIXTURES)
def test_default_path_reproduces_original_without_the_package(converted, fixture, tmp_path):
    """Remote code only (no `modeling_sphinx`): the default and the PIL processor, both calling patterns, give
    the recorded ids and pixels, and the model's logits are the package's on the same machine (which
    `test_converted_model_reproduces_original` holds to the original's within 1e-4). Compared with the package
    rather than with the recording, because the original's float16 view resize rounds a few values by the
    machine's float32 arithmetic: a CI machine once put this path 1.8e-4 from the recording."""
    folder, manifest = converted[fixture]
    questions = {image: manifest["inputs"][image]["question"] for image in ("astronaut", "chelsea_crop")}
    logits = str(tmp_path / "remote_logits.safetensors")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_DEFAULT_PATH, str(folder), str(PARITY), fixture, json.dumps(questions), logits],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},  # this folder's code, not a cached one
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    remote_logits = load_file(logits)
    assert len(report) == 8
    package_model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    for key, row in report.items():
        backend, image, _ = key.split("/")
        reference = load_file(PARITY / fixture / f"reference_{image}.safetensors")
        assert row["class"] == ("SphinxImageProcessorPil" if backend == "pil" else "SphinxImageProcessor"), key
        assert row["ids"] == reference["input_ids"][0].tolist(), key
        pixels = _recorded_pixels(reference)
        assert row["pixels"] == hashlib.sha256(pixels.numpy().tobytes()).hexdigest(), key
        package = _text_logits(
            package_model, _with_image_tokens(reference["input_ids"], package_model.config), pixels, reference
        )
        assert (remote_logits[key] - package).abs().max() <= 1e-5, key


def test_dinov2_position_table_resized_like_the_original():
    shard = torch.load(PARITY / "llama_ens" / "checkpoint" / "consolidated.00-of-02.model.pth", weights_only=True)
    table = shard["model"]["llma.dinov2_vitg14.pos_embed"]
    resized = resize_dinov2_pos_embed(table, 16)
    reference = load_file(PARITY / "llama_ens" / "reference_astronaut.safetensors")
    patch_part = resized[:, 1:].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    assert torch.equal(patch_part, reference["dinov2_pos_embed_interpolated_patch_part"])
    assert torch.equal(resized[:, :1], table[:, :1])


def _tiny_encoder_sizes(config: SphinxConfig) -> dict:
    """The tiny presets described in the original's own terms."""
    sizes = {}
    if config.clip_config is not None:
        args = config.clip_config.model_args
        sizes["clip_ViT-L-14"] = {
            "vision_cfg": {
                "width": args["embed_dim"],
                "layers": args["depth"],
                "head_width": args["embed_dim"] // args["num_heads"],
            }
        }
    if config.convnext_config is not None:
        sizes["timm_convnext_xxlarge"] = dict(config.convnext_config.model_args)
    if config.dinov2_config is not None:
        args = config.dinov2_config.model_args
        sizes["dinov2_vit_giant2"] = {k: args[k] for k in ("embed_dim", "depth", "num_heads")}
    if config.qformer_config is not None:
        vision, qformer = config.qformer_config.vision_config, config.qformer_config.qformer_config
        fields = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
        sizes["blip2"] = {
            "vision": {f: getattr(vision, f) for f in fields},
            "qformer": {
                **{f: getattr(qformer, f) for f in fields},
                "encoder_hidden_size": qformer.encoder_hidden_size,
            },
        }
    return sizes


@pytest.mark.parametrize("variant,shards", [("sphinx-moe", 2), ("sphinx-tiny", 1), ("sphinx-2k", 2)])
def test_round_trip_through_the_original_layout(tmp_path, variant, shards):
    torch.manual_seed(0)
    spm = train_tiny_sentencepiece()
    config = SphinxConfig.from_variant(variant, tiny=True, text_config={"vocab_size": 513})
    model = SphinxForConditionalGeneration(config).eval()
    with torch.no_grad():  # the converter re-creates these rows; make them equal to what it writes
        embed = model.model.language_model.embed_tokens.weight
        embed[-1] = embed[:-1].mean(0)
        model.lm_head.weight[-1] = 0
    original = tmp_path / "original"
    write_original_checkpoint(model, original, num_shards=shards)
    (original / "tokenizer.model").write_bytes(spm)
    out = convert_checkpoint(
        original, tmp_path / "hf", dtype="float32", encoder_sizes=_tiny_encoder_sizes(config), verify=True
    )
    converted = SphinxForConditionalGeneration.from_pretrained(out)
    expected = model.state_dict()
    for key, tensor in converted.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


def _copy_fixture(tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(PARITY / "llama_ens" / "checkpoint", folder)
    sizes = json.loads((PARITY / "llama_ens" / "manifest.json").read_text())["size_changes_vs_real_model"]
    return folder, sizes


def _rewrite_shard(path, edit):
    shard = torch.load(path, weights_only=True)
    edit(shard["model"])
    torch.save(shard, path)


BAD_CHECKPOINTS = {
    "missing shard": (lambda f: (f / "consolidated.01-of-02.model.pth").unlink(), "missing ranks \\[1\\]"),
    "extra shard": (
        lambda f: shutil.copy(f / "consolidated.01-of-02.model.pth", f / "consolidated.02-of-02.model.pth"),
        "unexpected ranks \\[2\\]",
    ),
    "count mismatch": (
        lambda f: (f / "consolidated.01-of-02.model.pth").rename(f / "consolidated.01-of-03.model.pth"),
        "disagree on the shard count",
    ),
    "unknown llama_type": (
        lambda f: (f / "meta.json").write_text('{"llama_type": "llama_ens7"}'),
        "unknown llama_type 'llama_ens7'",
    ),
    "truncated pth": (
        lambda f: (f / "consolidated.00-of-02.model.pth").write_bytes(
            (f / "consolidated.00-of-02.model.pth").read_bytes()[:5000]
        ),
        "consolidated.00-of-02.model.pth: cannot read the shard",
    ),
    "replicas disagree": (
        lambda f: _rewrite_shard(f / "consolidated.01-of-02.model.pth", lambda s: s["llma.norm.weight"].add_(1)),
        "replicated tensor 'norm.weight' differs between shard 0 and shard 1",
    ),
    "unexpected key": (
        lambda f: [
            _rewrite_shard(f / name, lambda s: s.__setitem__("llma.extra_head.weight", torch.zeros(2)))
            for name in ("consolidated.00-of-02.model.pth", "consolidated.01-of-02.model.pth")
        ],
        "unexpected keys .*'extra_head.weight'",
    ),
    "missing key": (
        lambda f: [
            _rewrite_shard(f / name, lambda s: s.pop("llma.end_img"))
            for name in ("consolidated.00-of-02.model.pth", "consolidated.01-of-02.model.pth")
        ],
        "missing keys .*'model.end_img'",
    ),
    "keys differ between shards": (
        lambda f: _rewrite_shard(f / "consolidated.01-of-02.model.pth", lambda s: s.pop("llma.end_img")),
        "shard 1 has different keys than shard 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoints_give_clear_errors_and_write_nothing(tmp_path, case):
    folder, sizes = _copy_fixture(tmp_path)
    damage, message = BAD_CHECKPOINTS[case]
    damage(folder)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(folder, out, dtype="float32", encoder_sizes=sizes)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no partial folder left beside it


def test_shape_that_does_not_fit_the_config(tmp_path):
    folder, sizes = _copy_fixture(tmp_path)
    sizes["dinov2_vit_giant2"]["embed_dim"] = 51
    sizes["feature_widths"]["dinov2"] = 51
    with pytest.raises(
        ConversionError, match=r"gives model\.dinov2\.\S+ of shape \[.*48.*\] but the config expects \[.*51.*\]"
    ):
        convert_checkpoint(folder, tmp_path / "out", dtype="float32", encoder_sizes=sizes)
    assert not (tmp_path / "out").exists()
    sizes["dinov2_vit_giant2"]["embed_dim"] = 50  # not divisible by its 3 heads
    sizes["feature_widths"]["dinov2"] = 50
    with pytest.raises(ConversionError, match="do not make a valid model"):
        convert_checkpoint(folder, tmp_path / "out", dtype="float32", encoder_sizes=sizes)
    sizes["dinov2_vit_giant2"]["embed_dim"] = 51  # a valid model again, only the stated width is wrong
    sizes["feature_widths"]["dinov2"] = 99
    with pytest.raises(ConversionError, match="feature_widths.dinov2 is 99"):
        convert_checkpoint(folder, tmp_path / "out", dtype="float32", encoder_sizes=sizes)


def test_sharded_bfloat16_output(tmp_path):
    folder, sizes = _copy_fixture(tmp_path)
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    out = tmp_path / "hf"
    code = main(
        ["convert", str(folder), str(out), "--max-shard-size", "1MB", "--encoder-sizes", str(tmp_path / "sizes.json")]
    )
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / name).is_file() for name in files)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(text="<image>Hi", images=Image.new("RGB", (30, 20)), return_tensors="pt")
    assert torch.isfinite(model(**inputs).logits.float()).all()
