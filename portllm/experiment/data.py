"""The experiment's world, made in code: a word-level vocabulary and tokenizer, a pretraining corpus,
its shifted versions (the vendor's continued pretraining), and three downstream tasks.

Sentences mention animals, foods, places and numbers. Tasks (each example: prompt words, answer word):

* ``topic``: classify a sentence as about an animal or a food (``... topic ?`` → ``animal``/``food``);
* ``facts``: recall an arbitrary attribute of each animal, learned only in fine-tuning
  (``fact of cat ?`` → ``blue``);
* ``arith``: add two digits (``3 plus 4 equals`` → ``7``).
"""

from __future__ import annotations

import random

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "ant", "elk", "yak", "eel"]
FOODS = ["bread", "rice", "soup", "cake", "plum", "corn", "bean", "pear", "fig", "kale", "nut", "egg"]
PLACES = ["town", "farm", "lake", "hill", "park", "road", "barn", "shop"]
COLORS = ["red", "blue", "green", "gray", "pink", "gold", "black", "white"]
VERBS = ["sees", "likes", "finds", "eats", "wants", "has", "takes", "makes"]
FILLER = ["the", "a", "in", "on", "near", "with", "and", "very", "old", "new", "big", "small", "one", "some"]
NUMBERS = [str(i) for i in range(19)]
MARKERS = ["topic", "?", "animal", "food", "fact", "of", "plus", "equals", "is", "."]
SPECIAL = ["<pad>", "<unk>", "<bos>"]
VOCAB = SPECIAL + sorted(set(ANIMALS + FOODS + PLACES + COLORS + VERBS + FILLER + NUMBERS + MARKERS))

TASKS = ("topic", "facts", "arith")


def make_tokenizer():
    """A word-level transformers tokenizer over VOCAB (whitespace-split, <bos> prepended)."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>")


def sentence(rng: random.Random, shift: float = 0.0) -> str:
    """One corpus sentence. ``shift`` (0..1) moves the distribution: more places, colours and
    numbers, other verbs, and a reversed word order in some sentences (the evolved corpus)."""
    subj = rng.choice(ANIMALS)
    obj = rng.choice(FOODS + ANIMALS)
    words = [rng.choice(["the", "a"]), subj, rng.choice(VERBS), rng.choice(["the", "a", "some"]), obj]
    if rng.random() < 0.3 + 0.5 * shift:
        words += [rng.choice(["in", "near", "on"]), "the", rng.choice(PLACES)]
    if rng.random() < 0.2 + 0.6 * shift:
        words += ["with", rng.choice(COLORS), rng.choice(FOODS)]
    if rng.random() < 0.1 + 0.6 * shift:
        a, b = rng.randrange(10), rng.randrange(10)
        words += ["and", str(a), "plus", str(b), "equals", str(a + b)]
    if rng.random() < 0.15:
        kind = rng.choice(["animal", "food"])
        words += ["and", "the", rng.choice(ANIMALS if kind == "animal" else FOODS), "is", "a", kind]
    if rng.random() < 0.5 * shift:
        words = words[::-1]
    return " ".join(words) + " ."


def corpus(n: int, seed: int, shift: float = 0.0) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng, shift) for _ in range(n)]


def fact_table(seed: int = 1234) -> dict[str, str]:
    """The arbitrary animal → colour facts of the ``facts`` task (fixed by seed)."""
    rng = random.Random(seed)
    return {a: rng.choice(COLORS) for a in ANIMALS}


def task_examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    facts = fact_table()
    for _ in range(n):
        if task == "topic":
            label = rng.choice(["animal", "food"])
            key = rng.choice(ANIMALS if label == "animal" else FOODS)
            words = [rng.choice(FILLER) for _ in range(4)]
            words.insert(rng.randrange(5), key)
            out.append((" ".join(words) + " topic ?", label))
        elif task == "facts":
            a = rng.choice(ANIMALS)
            out.append((f"fact of {a} ?", facts[a]))
        elif task == "arith":
            a, b = rng.randrange(10), rng.randrange(10)
            out.append((f"{a} plus {b} equals", str(a + b)))
        else:
            raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    return out
