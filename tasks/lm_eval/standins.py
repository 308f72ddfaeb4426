"""The test split of vibechat's stand-in tasks as lm-evaluation-harness datasets (custom_dataset loaders), and the
grade of a written answer (process_results)."""

import datasets

from tasks.standins import StandinMultipleChoice, StandinMultipleChoiceGenerative

WRITTEN = StandinMultipleChoiceGenerative(split="test")


def multiple_choice(**_metadata) -> dict[str, datasets.Dataset]:
    """One row per question: the user message chat_eval prompts with, the choice letters, the correct index and
    letter."""
    task, rows = StandinMultipleChoice(split="test"), []
    for conversation in (task[i] for i in range(len(task))):
        letters = conversation["letters"]
        rows.append({"question": conversation["messages"][0]["content"], "letters": letters,
                     "target": letters.index(conversation["answer"]), "answer": conversation["answer"]})
    return {"test": datasets.Dataset.from_list(rows)}


def grade_reply(doc: dict, results: list[str]) -> dict[str, int]:
    """exact_match: 1 when the reply's first word is the right letter, graded by vibechat's own task."""
    return {"exact_match": WRITTEN.evaluate(doc, results[0])}
