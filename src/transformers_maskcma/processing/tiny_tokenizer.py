"""The embedded tiny tokenizer: a byte-level BPE trained locally and deterministically (no Hub, no network)
on a fixed English corpus of referring prompts and answers, with the special tokens the model needs."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..modeling.tiny_configs import TINY_SPECIAL_TOKENS, TINY_VOCAB_SIZE

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta", "grey")
_SHAPES = ("circle", "square", "triangle", "shape", "object", "man", "woman", "person", "dog", "cat", "car", "ball")
_PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle", "in front", "behind")
_MOTIONS = ("moves up", "moves down", "moves left", "moves right", "stays still", "is moving", "runs", "jumps")
_TEMPLATES = (
    "Please segment the {c} {s} {p}.",
    "Can you segment the {s} that {m}?",
    "What is the {c} {s} {p} in this image? Please respond with a segmentation mask.",
    "Segment the {c} {s}.",
    "the {s} {p} that {m}",
    "Sure, it is [SEG].",
    "Sure, [SEG].",
    "It is [SEG] and [SEG].",
    "There is no such object in the image.",
    "<image>\nPlease segment the {c} {s} in the video.",
)


def tiny_corpus() -> list[str]:
    """The fixed training corpus (ordered, so training is deterministic)."""
    lines = []
    for template in _TEMPLATES:
        for colour in _COLOURS:
            for shape in _SHAPES:
                for index, place in enumerate(_PLACES):
                    motion = _MOTIONS[(index + len(shape)) % len(_MOTIONS)]
                    lines.append(template.format(c=colour, s=shape, p=place, m=motion))
    return lines


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE (vocabulary 640; special tokens at ids 0–6, see `tiny_configs`)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(TINY_SPECIAL_TOKENS[1:]),
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    for token_id, token in enumerate(TINY_SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(f"tiny tokenizer: special token {token!r} did not get id {token_id}")
    return tokenizer
