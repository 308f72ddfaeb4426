"""ARC: grade-school science questions with 3-5 choices (allenai/ai2_arc), Easy and Challenge sets."""

import random

from tasks.common import MultipleChoiceTask, check_choice, multiple_choice_conversation
from tasks.hub import load_parquet, row

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")
COLUMNS = ["id", "question", "choices", "answerKey"]


def arc_conversation(row: dict) -> dict:
    """An ARC row as a conversation; the dataset's labels (A-E, sometimes 1-4) become letters A, B, C..."""
    labels = row["choices"]["label"]
    return multiple_choice_conversation(
        row["question"], row["choices"]["text"], labels.index(row["answerKey"]), id=row["id"]
    )


class ARC(MultipleChoiceTask):
    def __init__(self, subset: str, split: str, **kwargs):
        super().__init__(**kwargs)
        check_choice("ARC subset", subset, SUBSETS)
        check_choice("ARC split", split, SPLITS)
        self.subset = subset
        self.table = load_parquet(
            "arc", "allenai/ai2_arc", [f"{subset}/{split}-00000-of-00001.parquet"], COLUMNS,
            standin="multiple-choice-standin",
        )
        # a fixed shuffle, so that a prefix slice [:n] is a fair sample
        self.order = list(range(self.table.num_rows))
        random.Random(42).shuffle(self.order)

    @property
    def name(self) -> str:
        return self.subset

    def num_examples(self) -> int:
        return self.table.num_rows

    def get_example(self, index: int) -> dict:
        return arc_conversation(row(self.table, self.order[index]))
