"""The Task interface that every dataset implements, and the ways to combine tasks.

A task is a list of conversations: {"messages": [{"role": ..., "content": ...}, ...], ...extra fields}.
The content of a message is a string, or for the assistant a list of parts
{"type": "text" | "python" | "python_output", "text": ...} when it uses the calculator tool.
"""

import random

from vibechat.common import VibechatError

LETTERS = "ABCDEFGHIJ"


class Task:
    """A dataset of conversations, seen through the slice [start:stop:step] of its examples.

    Subclasses implement num_examples and get_example, and for evaluation eval_type and evaluate.
    """

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if step < 1:
            raise VibechatError(f"{type(self).__name__}: step must be a positive integer, got {step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def name(self) -> str:
        """What reports call this task; stand-ins say so in their name."""
        return type(self).__name__

    @property
    def eval_type(self) -> str:
        """'multiple_choice' (score the answer letter) or 'generative' (sample and check the reply)."""
        raise NotImplementedError

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        """1 if assistant_response answers the conversation's question correctly, else 0."""
        raise NotImplementedError

    def reward(self, conversation: dict, assistant_response: str) -> float:
        """The RL reward: correctness as a float."""
        return float(self.evaluate(conversation, assistant_response))

    def _indices(self) -> range:
        return range(self.num_examples())[self.start:self.stop:self.step]

    def __len__(self) -> int:
        return len(self._indices())

    def __getitem__(self, index: int) -> dict:
        return self.get_example(self._indices()[index])


class TaskMixture(Task):
    """The examples of several tasks shuffled together, the same way for a given seed.

    Listing a task twice includes its examples twice: that is how to oversample a small task.
    """

    def __init__(self, tasks: list[Task], seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    @property
    def name(self) -> str:
        return "Mixture(" + ", ".join(task.name for task in self.tasks) + ")"

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> dict:
        t, i = self.index_map[index]
        return self.tasks[t][i]


def check_choice(what: str, value: str, allowed) -> None:
    """One clear error for a subset/split argument that a task does not have."""
    if value not in allowed:
        raise VibechatError(f"{what} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def render_mc(question: str, letters: list[str], choices: list[str]) -> str:
    """A multiple-choice question as the user asks it: the question, lettered choices, what to answer."""
    lines = [question.strip(), ""]
    lines += [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    lines += ["", "Answer with the letter of the correct choice."]
    return "\n".join(lines)


def multiple_choice_conversation(question: str, choices: list[str], answer_index: int, **extra) -> dict:
    """The user asks a lettered question, the assistant replies with the letter alone."""
    letters = list(LETTERS[: len(choices)])
    answer = letters[answer_index]
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": answer},
        ],
        "letters": letters,
        "answer": answer,
        **extra,
    }


def answer_letter(reply: str, letters: list[str]) -> str | None:
    """The letter a written reply answers with: its first word, without the punctuation of "B." or "(B)", if that
    is one of the choices' letters."""
    words = reply.split(maxsplit=1)
    word = words[0].strip("().:,") if words else ""
    return word if word in letters else None


class MultipleChoiceTask(Task):
    """Questions answered with one letter; evaluation compares the letter."""

    @property
    def eval_type(self) -> str:
        return "multiple_choice"

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        return int(assistant_response.strip() == conversation["answer"])
