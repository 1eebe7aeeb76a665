"""SPHINX processor: image processor + LLaMA tokenizer + the original chat template.

Each `<image>` placeholder is expanded to `num_image_tokens` copies that the model fills with the visual
tokens of every view of that image. The chat template puts all images right after BOS, as the original does.

This file is copied flat into saved model folders as remote code.
"""

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput, get_image_size, to_numpy_array
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput
from transformers.utils import logging

from .tasks_sphinx import SEPARATOR, GroundedText, parse_grounding, strip_separator

logger = logging.get_logger(__name__)


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
        text = self._templated(images, text)
        return super().__call__(images=images, text=self._without_leading_bos(text, kwargs), **kwargs)

    def _templated(self, images, text):
        """Plain questions about images, without `<image>` (what `pipe(images=..., text="What is it?")` passes),
        as user turns of SPHINX's chat template, one per text, each with its images; a text that has `<image>`
        is the caller's own prompt and stays as it is."""
        texts = [text] if isinstance(text, str) else text
        if images is None or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            return text
        if any(self.image_token in t for t in texts):
            return text
        per_text = [images] if isinstance(text, str) else images
        if not isinstance(per_text, (list, tuple)) or len(per_text) != len(texts):
            raise ValueError(
                f"{len(texts)} texts without {self.image_token!r} for the images given: put {self.image_token!r} "
                "where each image goes, or pass messages, e.g. text=[{'role': 'user', 'content': [{'type': "
                "'image', 'image': image}, {'type': 'text', 'text': 'What is it?'}]}]"
            )
        logger.warning_once(
            "a text without <image> was given with images: it is asked as a user turn of SPHINX's chat template, "
            "after its images; pass messages to write the conversation yourself"
        )
        rendered = []
        for question, own in zip(texts, per_text, strict=True):
            count = len(own) if isinstance(own, (list, tuple)) else 1
            turn = {"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": question}]}
            rendered.append(self.apply_chat_template([turn], add_generation_prompt=True, tokenize=False))
        return rendered[0] if isinstance(text, str) else rendered

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

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """`ProcessorMixin.apply_chat_template`; an image URL that cannot be fetched (no network, a dead link) is
        one error naming it, not the HTTP client's."""
        try:
            return super().apply_chat_template(conversation, chat_template, **kwargs)
        except Exception as error:
            urls = _image_urls(conversation)
            if not urls or type(error).__module__.split(".")[0] not in HTTP_CLIENTS:
                raise
            raise ValueError(
                f"cannot fetch the image at {urls[0]} ({type(error).__name__}: {error}); download it and pass its "
                "path, or the image itself"
            ) from None

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

    def post_process_generation(self, text, images=None, *, image_sizes=None) -> GroundedText | list[GroundedText]:
        """Parse boxes (`<p>phrase</p>[x1,y1,x2,y2;…]`) and points (`[x,y]`) of answers into image pixels.

        `text` is one answer or a list. The pixels are those of `images`, the original image of each answer (one
        image for one answer), or of `image_sizes=`, given by keyword as `(height, width)` (one pair for one
        answer). A bare size in place of the image is refused: PIL's `image.size` is `(width, height)`, and the
        wrong order would pass silently with wrong boxes.
        """
        if (images is None) == (image_sizes is None):
            raise ValueError("post_process_generation needs the image(s), or image_sizes=(height, width) by keyword")
        single = isinstance(text, str)
        if images is not None:
            many_images = isinstance(images, (list, tuple)) and not _is_size(images)
            image_list = list(images) if many_images else [images]
            if any(_is_size(image) for image in image_list):
                raise ValueError(
                    "post_process_generation takes the image itself, or image_sizes=(height, width) by keyword, "
                    f"not a bare size {images!r}: PIL's image.size is (width, height)"
                )
            sizes = [_height_width(image) for image in image_list]
        else:
            sizes = [tuple(image_sizes)] if single else [tuple(size) for size in image_sizes]
        texts = [text] if single else list(text)
        if len(texts) != len(sizes):
            raise ValueError(f"got {len(texts)} answers but {len(sizes)} images or image sizes")
        grounded = [parse_grounding(strip_separator(t), size) for t, size in zip(texts, sizes, strict=True)]
        return grounded[0] if single else grounded

    def separator_token_ids(self) -> list[list[int]]:
        """Token sequences of `\\n###` with and without SentencePiece's leading-space piece (as the original)."""
        with_space = self.tokenizer.encode(SEPARATOR, add_special_tokens=False)
        first_piece = self.tokenizer.convert_ids_to_tokens(with_space[:1])
        without_space = with_space[1:] if first_piece == ["▁"] else with_space
        return [with_space, without_space] if without_space != with_space else [with_space]


HTTP_CLIENTS = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _image_urls(conversation) -> list[str]:
    """The `http(s)` image URLs of a conversation or of a batch of them."""
    if isinstance(conversation, dict):
        found = [v for v in conversation.values() if isinstance(v, str) and v.startswith(("http://", "https://"))]
        found = found if conversation.get("type") == "image" else []
        return found + [url for value in conversation.values() for url in _image_urls(value)]
    if isinstance(conversation, (list, tuple)):
        return [url for item in conversation for url in _image_urls(item)]
    return []


def _is_size(value) -> bool:
    return (
        isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value)
    )


def _height_width(image) -> tuple[int, int]:
    """`(height, width)` of a PIL image, or of an array or tensor in either channel order."""
    if hasattr(image, "height") and hasattr(image, "width"):
        return image.height, image.width
    return tuple(get_image_size(to_numpy_array(image)))


__all__ = ["SphinxProcessor"]
