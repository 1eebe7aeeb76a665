"""A text-only LLM folder (LLaMA, Mixtral) seen as a SPHINX checkpoint, so that it can be mixed into SPHINX's
language model: `TextDonor`.

Its tensors are matched to SPHINX's by name, `model.X` to `model.language_model.X` and `lm_head.weight` to itself,
and by shape. What it lacks comes from the base model: the vision towers, the projectors, the image boundary
embeddings, and the rows SPHINX adds to the vocabulary (the `<image>` token) of `embed_tokens` and `lm_head`. Every
other difference (another width, depth, vocabulary, number of experts, or a tensor SPHINX's language model has no
place for) is refused in one line naming both shapes or names. Only the base's tensors are read where the donor has
none, so mixing a donor with the base leaves the vision side and the `<image>` rows as the base has them.
"""

import json
import re
from pathlib import Path

import torch

from ..folder.shards import LazyCheckpoint
from .methods import RecipeError

TEXT_ONLY_TYPES = ("llama", "mixtral")
LANGUAGE_MODEL = "model.language_model."
# what the tensors' shapes do not show; compared where both configs give it
COMPARED_FIELDS = ("num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps")
NOT_WEIGHTS = re.compile(r"rotary_emb\.inv_freq$")  # buffers some older exports saved


def is_text_only(config: dict) -> bool:
    return config.get("model_type") in TEXT_ONLY_TYPES


def sphinx_name(donor_name: str) -> str:
    return LANGUAGE_MODEL + donor_name.removeprefix("model.") if donor_name.startswith("model.") else donor_name


def _layers(names) -> int:
    found = {int(match.group(1)) for name in names if (match := re.search(r"\.layers\.(\d+)\.", name))}
    return max(found) + 1 if found else 0


class TextDonor:
    """`folder`'s LLM tensors under SPHINX's names, the base's tensors for the rest, read like a `LazyCheckpoint`'s
    (`folder`, `get`)."""

    def __init__(self, folder: Path, config: dict, base: LazyCheckpoint, base_config: dict):
        self.folder, self.base = folder, base
        text_type = base_config.get("text_config", {}).get("model_type", "llama")
        if config.get("model_type") != text_type:
            raise RecipeError(
                f"model {folder}: a text-only {config.get('model_type')} cannot give a SPHINX language model of type "
                f"{text_type}"
            )
        try:
            self.checkpoint = LazyCheckpoint(folder)
        except ValueError as error:
            raise RecipeError(f"model {folder}: {error}") from error
        own = [name for name in self.checkpoint.tensor_names() if not NOT_WEIGHTS.search(name)]
        self.names = {sphinx_name(name): name for name in own}
        self._check(base_config)
        text_config = base_config.get("text_config", {})
        for key in COMPARED_FIELDS:
            if key in config and key in text_config and config[key] != text_config[key]:
                raise RecipeError(
                    f"model {folder}: {key} is {config[key]}, the base's language model has {text_config[key]}"
                )

    def _check(self, base_config: dict):
        ours = [
            name for name in self.base.tensor_names() if name.startswith(LANGUAGE_MODEL) or name == "lm_head.weight"
        ]
        depth, base_depth = _layers(self.names), _layers(ours)
        if depth != base_depth:
            raise RecipeError(
                f"model {self.folder}: {depth} decoder layers, but the base's language model has {base_depth}"
            )
        unplaced = sorted(set(self.names) - set(ours))
        if unplaced:
            raise RecipeError(
                f"model {self.folder}: tensor {self.names[unplaced[0]]} has no place in SPHINX's language model "
                f"({len(unplaced)} such); is it another architecture?"
            )
        missing = sorted(set(ours) - set(self.names))
        if missing:
            raise RecipeError(
                f"model {self.folder}: lacks {missing[0].removeprefix(LANGUAGE_MODEL)} of the base's LLM"
            )
        image_token = base_config.get("image_token_id")
        for name in ours:
            theirs, base_shape = list(self.checkpoint.shape(self.names[name])), list(self.base.shape(name))
            rows = base_shape[0] - theirs[0] if theirs[1:] == base_shape[1:] else None
            if name.endswith(("embed_tokens.weight", "lm_head.weight")) and rows == 1 and image_token == theirs[0]:
                continue  # SPHINX's `<image>` row, which a text-only LLM lacks
            if theirs != base_shape:
                embeddings = "embed_tokens" in name or name == "lm_head.weight"
                vocabulary = " (another vocabulary)" if embeddings and theirs[1:] == base_shape[1:] else ""
                raise RecipeError(
                    f"model {self.folder}: tensor {self.names[name]} has shape {theirs}, the base's {name} has "
                    f"{base_shape}{vocabulary}"
                )

    def get(self, name: str) -> torch.Tensor:
        if name not in self.names:
            return self.base.get(name)
        tensor = self.checkpoint.get(self.names[name])
        if tensor.shape[0] < self.base.shape(name)[0]:
            tensor = torch.cat([tensor, self.base.get(name)[tensor.shape[0] :].to(tensor.dtype)])
        return tensor

    def vocabulary_matches(self, base_folder: Path) -> bool:
        """Whether the donor's tokenizer gives the ids below its vocabulary size the base's tokens (true when
        either has no tokenizer.json to compare)."""
        theirs, ours = vocabulary(self.folder), vocabulary(base_folder)
        if theirs is None or ours is None:
            return True
        size = self.checkpoint.shape(self.names[LANGUAGE_MODEL + "embed_tokens.weight"])[0]
        return {k: v for k, v in ours.items() if v < size} == {k: v for k, v in theirs.items() if v < size}


def vocabulary(folder: Path) -> dict | None:
    """The token → id table of the folder's tokenizer.json (a Unigram model's `[token, score]` list by position),
    or None without one."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    table = json.loads(path.read_text()).get("model", {}).get("vocab") or {}
    return table if isinstance(table, dict) else {entry[0]: index for index, entry in enumerate(table)}
