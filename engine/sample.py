"""The embedded default's data: a corpus this project generates itself, and a tokenizer trained on it.

The corpus is small made-up prose (a seeded template grammar), so the default job needs no
download and its loss falls visibly within a minute of CPU training.
"""
from __future__ import annotations

import functools
import random

_NAMES = ["Ada", "Bram", "Cleo", "Dev", "Esme", "Finn", "Greta", "Hugo", "Iris", "Jonas"]
_PLACES = ["the harbour", "the old mill", "the market", "the library", "the orchard",
           "the lighthouse", "the bakery", "the station", "the river bank", "the workshop"]
_OBJECTS = ["a lantern", "a map", "a loaf of bread", "a brass key", "a letter", "a compass",
            "a basket of apples", "a wooden boat", "a notebook", "a kite"]
_TIMES = ["In the morning", "At noon", "Late in the evening", "Before dawn", "After the rain",
          "On the first day of spring", "When the bells rang", "At dusk"]
_VERBS = ["found", "carried", "mended", "lost", "painted", "traded", "hid", "opened"]
_FEELINGS = ["glad", "tired", "curious", "worried", "proud", "calm", "surprised"]
_WEATHER = ["The wind was cold", "The sky was clear", "Rain fell softly", "Fog covered the town",
            "The sun was warm"]


def _sentence(rng: random.Random) -> str:
    a, b = rng.sample(_NAMES, 2)
    kind = rng.randrange(6)
    if kind == 0:
        return f"{rng.choice(_TIMES)}, {a} went to {rng.choice(_PLACES)} and {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
    if kind == 1:
        return f"{a} gave {b} {rng.choice(_OBJECTS)}, and {b} was {rng.choice(_FEELINGS)}."
    if kind == 2:
        return f"{rng.choice(_WEATHER)}, so {a} stayed at {rng.choice(_PLACES)}."
    if kind == 3:
        return f'"Have you seen {rng.choice(_OBJECTS)}?" asked {a}. "Yes, at {rng.choice(_PLACES)}," said {b}.'
    if kind == 4:
        return f"{a} and {b} walked from {rng.choice(_PLACES)} to {rng.choice(_PLACES)}."
    return f"{a} felt {rng.choice(_FEELINGS)} because {b} had {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."


@functools.lru_cache(maxsize=4)
def sample_corpus(paragraphs: int = 1500, seed: int = 1234) -> tuple[str, ...]:
    """Paragraphs of generated prose, identical on every call and every machine."""
    rng = random.Random(seed)
    return tuple(" ".join(_sentence(rng) for _ in range(rng.randint(3, 7))) + "\n"
                 for _ in range(paragraphs))


def sample_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE trained on the sample corpus (about a second), GPT-2 style special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(sample_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
