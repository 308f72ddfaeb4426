"""MMLU: four-choice questions on 57 subjects (cais/mmlu); auxiliary_train is its ~100K-question training set."""

import random

from tasks.common import MultipleChoiceTask, check_choice, multiple_choice_conversation
from tasks.hub import load_parquet, row

SPLITS = {"all": ("auxiliary_train", "dev", "validation", "test"), "auxiliary_train": ("train",)}
COLUMNS = ["question", "subject", "choices", "answer"]


class MMLU(MultipleChoiceTask):
    def __init__(self, subset: str, split: str, **kwargs):
        super().__init__(**kwargs)
        check_choice("MMLU subset", subset, tuple(SPLITS))
        check_choice(f"MMLU {subset} split", split, SPLITS[subset])
        # the auxiliary_train config stores each row inside a struct column named "train"
        columns = ["train"] if subset == "auxiliary_train" else COLUMNS
        self.table = load_parquet(
            "mmlu", "cais/mmlu", [f"{subset}/{split}-00000-of-00001.parquet"], columns,
            standin="multiple-choice-standin",
        )
        self.nested = subset == "auxiliary_train"
        # the files are sorted by subject: a fixed shuffle makes a prefix slice [:n] a fair sample
        self.order = list(range(self.table.num_rows))
        random.Random(42).shuffle(self.order)

    @property
    def name(self) -> str:
        return "MMLU"

    def num_examples(self) -> int:
        return self.table.num_rows

    def get_example(self, index: int) -> dict:
        r = row(self.table, self.order[index])
        if self.nested:
            r = r["train"]
        return multiple_choice_conversation(r["question"], r["choices"], r["answer"], subject=r["subject"])
