"""The experiment's world, made in code: a word-level vocabulary and tokenizer, a pretraining corpus,
its shifted versions (the vendor's continued pretraining), and three downstream tasks.

Sentences mention animals, foods, places and numbers. Tasks (each example: prompt words, answer word):

* ``topic``: classify a sentence as about an animal or a food (``... topic ?`` → ``animal``/``food``);
* ``facts``: recall an arbitrary attribute of each animal, learned only in fine-tuning
  (``fact of cat ?`` → ``blue``, after 0 to 2 filler words);
* ``arith``: add two digits (``3 plus 4 equals`` → ``7``, after 0 to 2 filler words).

Each task's prompts are split by a hash (``split_of``) into train, val and test: the fine-tunes see
train, the learning rate is chosen on val, the tables report test.
"""

from __future__ import annotations

import random
import zlib

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


SPLITS = ("train", "val", "test")


def split_of(task: str, prompt: str) -> str:
    """The split a prompt belongs to, fixed by a hash of its key: 60% train, 20% val (the learning rate
    is chosen there, and the check's unlabeled prompts come from there), 20% test (what the tables
    report). The key is the prompt itself, except for ``arith``, where it is the pair of numbers: a test
    sum is one no fine-tune was trained on, in any wording."""
    key = " ".join(w for w in prompt.split() if w.isdigit()) if task == "arith" else prompt
    h = zlib.crc32(f"{task}|{key}".encode()) % 10
    return "train" if h < 6 else "val" if h < 8 else "test"


def _prefix(rng: random.Random) -> list[str]:
    """0 to 2 filler words before a prompt: the wordings that make the task spaces large enough to split."""
    return [rng.choice(FILLER) for _ in range(rng.choice((0, 1, 1, 2, 2)))]


def _example(task: str, rng: random.Random, facts: dict[str, str]) -> tuple[str, str]:
    if task == "topic":
        label = rng.choice(["animal", "food"])
        key = rng.choice(ANIMALS if label == "animal" else FOODS)
        words = [rng.choice(FILLER) for _ in range(4)]
        words.insert(rng.randrange(5), key)
        return " ".join(words) + " topic ?", label
    if task == "facts":
        a = rng.choice(ANIMALS)
        return " ".join(_prefix(rng) + ["fact", "of", a, "?"]), facts[a]
    if task == "arith":
        a, b = rng.randrange(10), rng.randrange(10)
        return " ".join(_prefix(rng) + [str(a), "plus", str(b), "equals"]), str(a + b)
    raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")


def task_examples(task: str, n: int, seed: int, split: str | None = None) -> list[tuple[str, str]]:
    """n examples (prompt, answer) of a task, drawn with ``seed``; from one split only (``split_of``), or
    from the whole space (``split=None``)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    rng = random.Random(seed)
    facts = fact_table()
    out = []
    while len(out) < n:
        ex = _example(task, rng, facts)
        if split is None or split_of(task, ex[0]) == split:
            out.append(ex)
    return out
