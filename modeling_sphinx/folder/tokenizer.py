"""LLaMA-style SentencePiece tokenizers for SPHINX, converted to a `tokenizers`-backed tokenizer.

Two SPHINX-specific choices, both needed to reproduce the original token ids:
- BOS is added (the original encodes every prompt with BOS, no EOS) and `<unk>` (id 0) pads, on the left.
- The SentencePiece dummy-prefix space is prepended to every text segment, also after special tokens: the
  original tokenised the prompt without placeholders, so the text after the `<image>` tokens must start with
  `▁` exactly as at the start of a prompt. transformers' `LlamaTokenizer` re-creates its pre-tokenizer on load,
  so the result is saved as a generic `TokenizersBackend` tokenizer that keeps it.
"""

import io
import tempfile
from pathlib import Path

from tokenizers import pre_tokenizers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from ..processing.tasks_sphinx import SYSTEM_PROMPT, TASK_INSTRUCTIONS

IMAGE_TOKEN = "<image>"

# Text for the offline tiny tokenizer: the template, the task prompts and plain English about images.
_TINY_CORPUS = [
    SYSTEM_PROMPT,
    *TASK_INSTRUCTIONS.values(),
    "### Human: What is shown in this image?\n### Assistant: The image shows a person in a white suit.",
    "### Human: Describe the image concisely.\n### Assistant: A cat sits on a wooden floor next to a cup.",
    "The picture contains a rocket on a launch pad, a cup of coffee, a page of printed text and a galaxy field.",
    "There are two people on the left and a car on the right. The sky is blue and the grass is green.",
    "Coordinates are written as [0.12,0.34,0.56,0.78] and points as [0.25,0.50]; several boxes use a semicolon.",
    "<p>a dog</p>[0.10,0.20,0.30,0.40] runs after <p>a ball</p>[0.50,0.55,0.60,0.70] in the park.",
    "Answer the question using a single word or phrase. Yes. No. Two. Red. Left. Right. Unanswerable.",
    "nose, left eye, right eye, left ear, right ear, left shoulder, right shoulder, left elbow, right elbow, "
    "left wrist, right wrist, left hip, right hip, left knee, right knee, left ankle, right ankle",
    "Convert this chart to a table. | year | value |\n| 2020 | 10 |\n| 2021 | 12 |",
]


def train_tiny_sentencepiece(vocab_size: int = 512) -> bytes:
    """A small LLaMA-like SentencePiece BPE model trained offline and deterministically (one thread)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_CORPUS * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def tokenizer_from_sentencepiece(model_file: str | Path, model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """SPHINX tokenizer from a SentencePiece `tokenizer.model`, with `<image>` added after the original pieces."""
    model_file = Path(model_file)
    if not model_file.is_file():
        raise ValueError(f"tokenizer file {str(model_file)!r} does not exist")
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.model").write_bytes(model_file.read_bytes())
        llama = LlamaTokenizer.from_pretrained(folder)
    backend = llama.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        model_max_length=model_max_length,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def tiny_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tokenizer.model"
        path.write_bytes(train_tiny_sentencepiece())
        return tokenizer_from_sentencepiece(path, model_max_length)
