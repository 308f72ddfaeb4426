"""The test split of vibechat's stand-in tasks as lm-evaluation-harness datasets (custom_dataset loaders)."""

import datasets

from tasks.standins import StandinMultipleChoice


def multiple_choice(**_metadata) -> dict[str, datasets.Dataset]:
    """One row per question: the user message chat_eval prompts with, the choice letters, the correct index."""
    task, rows = StandinMultipleChoice(split="test"), []
    for conversation in (task[i] for i in range(len(task))):
        letters = conversation["letters"]
        rows.append({"question": conversation["messages"][0]["content"], "letters": letters,
                     "target": letters.index(conversation["answer"])})
    return {"test": datasets.Dataset.from_list(rows)}
