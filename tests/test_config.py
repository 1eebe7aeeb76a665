from typing import NamedTuple

import pytest
from transformers import AutoConfig

from modeling_sphinx import SPHINX_VARIANTS, SphinxConfig
from modeling_sphinx.configuration_sphinx import VARIANT_DEFAULTS

ALL, LIGHT = ("qformer", "clip", "convnext", "dinov2"), ("convnext", "dinov2")


class Release(NamedTuple):
    """A release's row in full, then the geometry that follows from it."""

    llama_type: str
    text: str
    encoders: tuple[str, ...]
    image_size: int
    crop_grid: int
    convnext_view_size: int | None
    num_views: int
    num_image_tokens: int


GEOMETRY = ("num_views", "num_image_tokens")
RELEASES = {
    "sphinx": Release("llama_ens", "llama-2-13b", ALL, 224, 1, None, 1, 291),
    "sphinx-1k": Release("llama_ens5", "llama-2-13b", ALL, 448, 2, None, 5, 1455),
    "sphinx-v2-1k": Release("llama_ens5", "llama-2-13b", ALL, 448, 2, None, 5, 1455),
    "sphinx-2k": Release("llama_ens10", "llama-2-13b", ALL, 672, 3, None, 10, 2910),
    "sphinx-tiny": Release("llama_ens_light", "tinyllama-1.1b", LIGHT, 512, 1, 512, 1, 259),
    "sphinx-tiny-1k": Release("llama_ens5_light", "tinyllama-1.1b", LIGHT, 1024, 2, 512, 5, 1295),
    "sphinx-moe": Release("mixtral_sparse_ens", "mixtral-8x7b", ALL, 512, 1, 512, 1, 291),
    "sphinx-moe-1k": Release("mixtral_sparse_ens5", "mixtral-8x7b", ALL, 1024, 2, 512, 5, 1455),
}


def test_variant_rows_resolve_to_every_field():
    assert list(SPHINX_VARIANTS) == list(RELEASES)
    for variant, release in RELEASES.items():
        row = SPHINX_VARIANTS[variant]
        stated = {key: value for key, value in release._asdict().items() if key not in GEOMETRY}
        assert set(row) == {"llama_type", *VARIANT_DEFAULTS} == set(stated), variant
        assert row == stated, variant


@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("variant", sorted(SPHINX_VARIANTS))
def test_image_geometry(variant, tiny):
    config = SphinxConfig.from_variant(variant, tiny=tiny)
    release = RELEASES[variant]
    assert (config.image_size, config.crop_grid) == (release.image_size, release.crop_grid)
    assert (config.num_views, config.num_image_tokens) == (release.num_views, release.num_image_tokens)


def test_released_sizes():
    sphinx = SphinxConfig.from_variant("sphinx-1k")
    assert (sphinx.text_config.hidden_size, sphinx.text_config.num_hidden_layers) == (5120, 40)
    assert sphinx.text_config.intermediate_size == 13824
    assert sphinx.qformer_config.vision_config.num_hidden_layers == 39
    assert sphinx.qformer_config.qformer_config.hidden_size == 768
    assert (sphinx.image_size, sphinx.crop_grid, sphinx.num_views) == (448, 2, 5)

    tiny = SphinxConfig.from_variant("sphinx-tiny-1k")
    assert tiny.clip_config is None and tiny.qformer_config is None
    assert (tiny.text_config.hidden_size, tiny.text_config.num_key_value_heads) == (2048, 4)
    assert (tiny.image_size, tiny.convnext_view_size) == (1024, 512)

    moe = SphinxConfig.from_variant("sphinx-moe")
    assert moe.text_config.model_type == "mixtral"
    assert (moe.text_config.num_local_experts, moe.text_config.num_experts_per_tok) == (8, 2)
    assert moe.text_config.rope_parameters["rope_theta"] == 1e6
    assert SphinxConfig.from_variant("sphinx-2k").num_views == 10


def test_overrides_and_round_trip(tmp_path):
    config = SphinxConfig.from_variant("sphinx", tiny=True, text_config={"num_hidden_layers": 3}, image_size=448)
    assert config.text_config.num_hidden_layers == 3 and config.image_size == 448
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SphinxConfig)
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}


def test_bad_variant_and_fields():
    with pytest.raises(ValueError, match="unknown SPHINX variant 'sphinx-3k'"):
        SphinxConfig.from_variant("sphinx-3k")
    with pytest.raises(ValueError, match="crop_grid"):
        SphinxConfig.from_variant("sphinx", crop_grid=0)


def test_config_file_builds_the_same_config_without_subconfigspec(monkeypatch):
    """The remote-code config under transformers 5.19 and older, which lack `SubConfigSpec` (serving engines pin
    them): loaded from the file as a saved folder's remote code, it builds and round-trips the same config."""
    import importlib.util
    import json

    import transformers.configuration_utils

    import modeling_sphinx.configuration_sphinx as current

    monkeypatch.delattr(transformers.configuration_utils, "SubConfigSpec")
    spec = importlib.util.spec_from_file_location("sphinx_config_before_5_20", current.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SubConfigSpec is None and "sub_configs_defaults" not in vars(module.SphinxConfig)
    assert set(module.SphinxConfig.sub_configs) == {
        "text_config",
        "clip_config",
        "convnext_config",
        "dinov2_config",
        "qformer_config",
    }
    for variant in ("sphinx-1k", "sphinx-tiny", "sphinx-moe"):
        expected = current.SphinxConfig.from_variant(variant, tiny=True).to_dict()
        built = module.SphinxConfig.from_variant(variant, tiny=True)
        assert (
            type(built.text_config).__name__ == type(current.SphinxConfig.from_variant(variant).text_config).__name__
        )
        assert built.to_dict() == expected
        assert module.SphinxConfig(**json.loads(built.to_json_string())).to_dict() == expected
    with pytest.raises(ValueError, match="crop_grid must be >= 1"):
        module.SphinxConfig(crop_grid=0)
