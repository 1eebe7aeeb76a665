import pytest
from transformers import AutoConfig

from modeling_sphinx import SPHINX_VARIANTS, SphinxConfig

EXPECTED_IMAGE_TOKENS = {
    "sphinx": 291,
    "sphinx-1k": 1455,
    "sphinx-v2-1k": 1455,
    "sphinx-2k": 2910,
    "sphinx-tiny": 259,
    "sphinx-tiny-1k": 1295,
    "sphinx-moe": 291,
    "sphinx-moe-1k": 1455,
}


@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("variant", sorted(SPHINX_VARIANTS))
def test_image_token_counts(variant, tiny):
    config = SphinxConfig.from_variant(variant, tiny=tiny)
    assert config.num_image_tokens == EXPECTED_IMAGE_TOKENS[variant]


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
