import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration
from modeling_sphinx.cli import main
from modeling_sphinx.convert import (
    ConversionError,
    convert_checkpoint,
    resize_dinov2_pos_embed,
    write_original_checkpoint,
)
from modeling_sphinx.tokenizer import train_tiny_sentencepiece

from .conftest import PARITY

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
    ids = reference["input_ids"]
    n = config.num_image_tokens
    full = torch.cat([ids[:, :1], torch.full((1, n), config.image_token_id), ids[:, 1:]], dim=1)
    vocab = reference["logits_forward"].shape[-1]
    with torch.no_grad():
        logits = model(input_ids=full, pixel_values=pixels).logits[0, n:, :vocab]
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
    step_logits = torch.stack([step[0, :vocab] for step in generated.logits])
    assert (step_logits - reference["generate_step_logits"]).abs().max() <= 1e-4


@pytest.mark.parametrize("fixture", FIXTURES)
def test_processor_reproduces_recorded_inputs(converted, fixture):
    folder, manifest = converted[fixture]
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    for image in ("astronaut", "chelsea_crop"):
        reference = load_file(PARITY / fixture / f"reference_{image}.safetensors")
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": str(PARITY / fixture / "inputs" / f"{image}.png")},
                    {"type": "text", "text": manifest["inputs"][image]["question"]},
                ],
            }
        ]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        uint8 = reference["pixel_values_uint8"].permute(2, 0, 1).float()
        expected = reference.get("pixel_values", ((uint8 / 255 - CLIP_MEAN) / CLIP_STD)[None])
        assert (inputs["pixel_values"] - expected).abs().max() <= 1e-5
        text_ids = [i for i in inputs["input_ids"][0].tolist() if i != processor.image_token_id]
        assert text_ids == reference["input_ids"][0].tolist()


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
