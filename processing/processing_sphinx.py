"""SPHINX processor: image processor + LLaMA tokenizer + the original chat template.

Each `<image>` placeholder is expanded to `num_image_tokens` copies that the model fills with the visual
tokens of every view of that image. The chat template puts all images right after BOS, as the original does.

This file is copied flat into saved model folders as remote code.
"""

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput

from .tasks_sphinx import SEPARATOR, GroundedText, parse_grounding, strip_separator


class SphinxProcessor(ProcessorMixin):
    r"""
    num_image_tokens (`int`):
        Placeholder tokens per image: views × (2 boundary tokens + Q-Former queries + 257 fused tokens).
    image_token (`str`):
        The placeholder the tokenizer knows as a special token.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens=1455, **kwargs):
        self.num_image_tokens = num_image_tokens
        self.image_token = getattr(tokenizer, "image_token", None) or "<image>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.image_token!r} token; add it as a special token first")
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        """Expand each `<image>` of `text` into the image's placeholder tokens and preprocess `images`.

        A text that already starts with BOS (a prompt rendered with `apply_chat_template(tokenize=False)`) keeps
        exactly one BOS, whether or not `add_special_tokens` is set.
        """
        for modality in ("videos", "audio", "audios"):
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"SPHINX reads images and text, not videos or audio; got {modality}=")
        return super().__call__(images=images, text=self._without_leading_bos(text, kwargs), **kwargs)

    def _without_leading_bos(self, text, kwargs):
        """Drop a rendered leading BOS when the tokenizer is about to add its own."""
        add_special_tokens = kwargs.get("add_special_tokens", kwargs.get("text_kwargs", {}).get("add_special_tokens"))
        bos = self.tokenizer.bos_token
        adds_bos = bos is not None and self.tokenizer("")["input_ids"][:1] == [self.tokenizer.bos_token_id]
        if add_special_tokens is False or not adds_bos:
            return text

        def strip(sample):
            return sample[len(bos) :] if isinstance(sample, str) and sample.startswith(bos) else sample

        return strip(text) if isinstance(text, str) else text if text is None else [strip(t) for t in text]

    def _adjust_assistant_masks_indices(self, processed_dict, generation_indices):
        """The assistant mask of `return_assistant_tokens_mask` (TRL's `assistant_only_loss`), by the rule of
        `ProcessorMixin`'s own method: a token is masked when its characters overlap a generation span, the
        span shifted past the `<image>` placeholders expanded before it. transformers' loop compares every
        token's offsets in Python, 23 ms of a 59-ms demo batch; this compares them as arrays."""
        offset_mapping = processed_dict.pop("offset_mapping")
        replacements = processed_dict.pop("text_replacement_offsets", None) or [[]] * len(offset_mapping)
        masks = []
        for offsets, replaced, spans in zip(offset_mapping, replacements, generation_indices, strict=True):
            offsets = np.asarray(offsets).reshape(-1, 2)
            mask = np.zeros(len(offsets), dtype=bool)
            placeholder_ends = np.asarray([r["span"][1] for r in replaced], dtype=np.int64)
            chars_gained = np.asarray([0] + [r["new_span"][1] - r["span"][1] for r in replaced], dtype=np.int64)
            for span in spans:
                start, end = chars_gained[np.searchsorted(placeholder_ends, span, side="right")] + np.asarray(span)
                mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
            masks.append(mask.astype(np.int64).tolist())
        processed_dict["assistant_masks"] = masks
        return processed_dict

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        vision_data = {}
        if image_sizes is not None:
            vision_data["num_image_tokens"] = [self.num_image_tokens] * len(image_sizes)
            vision_data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**vision_data)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decode generated ids and drop the turn separator (`\\n###`) that ends each answer."""
        decoded = self.tokenizer.decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        if isinstance(decoded, str):
            return strip_separator(decoded)
        return [strip_separator(text) for text in decoded]

    def post_process_generation(self, text, image_sizes) -> GroundedText | list[GroundedText]:
        """Parse boxes (`<p>phrase</p>[x1,y1,x2,y2;…]`) and points (`[x,y]`) of answers into image pixels.

        `text` is one answer or a list; `image_sizes` gives `(height, width)` of each original image (one pair
        for a single answer).
        """
        if isinstance(text, str):
            return parse_grounding(strip_separator(text), tuple(image_sizes))
        if len(text) != len(image_sizes):
            raise ValueError(f"got {len(text)} answers but {len(image_sizes)} image sizes")
        return [parse_grounding(strip_separator(t), tuple(size)) for t, size in zip(text, image_sizes, strict=True)]

    def separator_token_ids(self) -> list[list[int]]:
        """Token sequences of `\\n###` with and without SentencePiece's leading-space piece (as the original)."""
        with_space = self.tokenizer.encode(SEPARATOR, add_special_tokens=False)
        first_piece = self.tokenizer.convert_ids_to_tokens(with_space[:1])
        without_space = with_space[1:] if first_piece == ["▁"] else with_space
        return [with_space, without_space] if without_space != with_space else [with_space]


__all__ = ["SphinxProcessor"]
