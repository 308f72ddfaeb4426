"""Synthetic spelling tasks that teach a token-level model to see the letters inside its tokens.

SpellingBee asks how often a letter occurs in a word; the assistant spells the word out, counts,
and checks the count with the calculator tool ('strawberry'.count('r')). SimpleSpelling asks
for the letters of a word. Words come from tasks/data/words.txt; example i of a split is
generated from a seed of (split, i), so any example can be built on its own, the same every time.
"""

import functools
import os
import random
import string

from tasks.common import Task, check_choice
from tasks.gsm8k import FinalNumberTask

WORDS_PATH = os.path.join(os.path.dirname(__file__), "data", "words.txt")
SPLITS = ("train", "test")

COUNT_QUESTIONS = [
    "How many {letter}s are in {word}?",
    "How many times does the letter {letter} appear in the word {word}?",
    "Count the letter '{letter}' in '{word}'.",
    "In the word {word}, how many '{letter}' are there?",
    "how many {letter} in {word}",
    "Can you tell me how many times '{letter}' shows up in \"{word}\"?",
]
SPELL_QUESTIONS = [
    "Spell the word: {word}",
    "How do you spell {word}?",
    "spell {word}",
    "Please spell out '{word}' letter by letter.",
]


@functools.cache
def load_words() -> list[str]:
    with open(WORDS_PATH, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


class SpellingBee(FinalNumberTask):
    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        check_choice("SpellingBee split", split, SPLITS)
        self.size, self.split = size, split

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"spellingbee/{self.split}/{index}")
        word = rng.choice(load_words())
        # mostly a letter of the word, sometimes one it lacks, so that zero is an answer too
        letter = rng.choice(word) if rng.random() < 0.7 else rng.choice(string.ascii_lowercase)
        count = word.count(letter)
        question = rng.choice(COUNT_QUESTIONS).format(letter=letter, word=word)
        lines, seen = [], 0
        for i, c in enumerate(word, 1):
            if c == letter:
                seen += 1
                lines.append(f"{i}. {c} <- {letter} number {seen}")
            else:
                lines.append(f"{i}. {c}")
        spelled = "\n".join(lines)
        parts = [
            {"type": "text", "text": f"Let me spell '{word}' out and count the letter '{letter}'.\n\n{spelled}\n\n"
                                     f"By hand I count {count}. Let me check with Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nBoth agree: '{letter}' appears {count} time{'s' * (count != 1)} "
                                     f"in '{word}'.\n\n#### {count}"},
        ]
        return {
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
            "answer": str(count),
        }


class SimpleSpelling(Task):
    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        check_choice("SimpleSpelling split", split, SPLITS)
        self.size, self.split = size, split

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"simplespelling/{self.split}/{index}")
        word = rng.choice(load_words())
        answer = f"{word}:{','.join(word)}"
        return {
            "messages": [
                {"role": "user", "content": rng.choice(SPELL_QUESTIONS).format(word=word)},
                {"role": "assistant", "content": answer},
            ],
            "answer": answer,
        }

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        return int(assistant_response.strip() == conversation["answer"])
