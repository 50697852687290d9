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


# --------------------------------------------------------------------------------------------
# builtin:instruct: chat records (the `messages` layout) about stories the same grammar writes, so
# instruction tuning (answer-only loss, multi-turn, packing) can be tried and tested with no file
# --------------------------------------------------------------------------------------------
_SYSTEM = "You answer questions about short stories."
_COUNTS = ["no", "one", "two", "three"]  # stories have one to three sentences


def _names_in(text: str) -> list[str]:
    """The sample's names in order of first appearance."""
    found = sorted((text.find(n), n) for n in _NAMES if n in text)
    return [n for _, n in found]


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _plain_sentence(rng: random.Random) -> str:
    """A sentence of the grammar without dialogue (a quoted exchange is two sentences in one)."""
    while '"' in (text := _sentence(rng)):
        pass
    return text


def _questions(rng: random.Random, sentences: list[str]) -> list[tuple[str, str]]:
    """Questions about one story with answers read off it, in a random order."""
    story = " ".join(sentences)
    names = _names_in(story)
    absent = rng.choice([n for n in _NAMES if n not in names])
    asked = rng.choice([absent, rng.choice(names)])
    qa = [("Who is in the story?", f"{_listing(names)}."),
          ("How many sentences does it have?", f"It has {_COUNTS[len(sentences)]} sentence"
           f"{'s' if len(sentences) > 1 else ''}."),
          ("What is its first sentence?", sentences[0]),
          ("What is its last sentence?", sentences[-1]),
          (f"Does {asked} appear in it?", "Yes." if asked in names else f"No, {asked} does not.")]
    rng.shuffle(qa)
    return qa


@functools.lru_cache(maxsize=4)
def sample_instructions(records: int = 1200, seed: int = 4321) -> tuple[dict, ...]:
    """Conversations about generated stories: a story and a question, then up to two follow-up
    questions (one to three assistant turns), some with a system message. Identical everywhere."""
    rng = random.Random(seed)
    out = []
    for _ in range(records):
        sentences = [_plain_sentence(rng) for _ in range(rng.randint(1, 3))]
        qa = _questions(rng, sentences)[: rng.choice([1, 1, 2, 3])]
        messages = [{"role": "system", "content": _SYSTEM}] if rng.random() < 0.25 else []
        for turn, (question, answer) in enumerate(qa):
            ask = f"{' '.join(sentences)}\n\n{question}" if turn == 0 else question
            messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return tuple(out)
