"""SmolTalk: general chat conversations for small models (HuggingFaceTB/smol-smoltalk)."""

from tasks.common import Task, check_choice
from tasks.hub import load_parquet, row

FILES = {
    "train": [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)],
    "test": ["data/test-00000-of-00001.parquet"],
}


class SmolTalk(Task):
    def __init__(self, split: str, **kwargs):
        super().__init__(**kwargs)
        check_choice("SmolTalk split", split, tuple(FILES))
        self.table = load_parquet(
            "smoltalk", "HuggingFaceTB/smol-smoltalk", FILES[split], ["messages"], standin="conversations-standin"
        )

    def num_examples(self) -> int:
        return self.table.num_rows

    def get_example(self, index: int) -> dict:
        messages = row(self.table, index)["messages"]
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
