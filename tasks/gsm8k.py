"""GSM8K: grade-school math word problems (openai/gsm8k), solved with the calculator tool.

The solutions mark each calculation as <<expression=result>> and end with '#### <answer>'.
Each calculation becomes a python part (the expression) and a python_output part (the result),
so the model learns to call the tool; grading compares the number after '####'.
"""

import re
from decimal import Decimal, InvalidOperation

from tasks.common import Task, check_choice
from tasks.hub import load_parquet, row

SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")
CALCULATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def extract_answer(text: str) -> str | None:
    """The number after the last '####', without thousands separators; None if there is none."""
    matches = FINAL_ANSWER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def same_number(a: str | None, b: str | None) -> bool:
    """Numeric equality of two extracted answers, so that '3.50' matches '3.5'."""
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def tool_call_parts(solution: str) -> list[dict]:
    """Split a solution into text parts and, for each <<expr=result>>, a python and a python_output part."""
    parts = []
    position = 0
    for match in CALCULATION.finditer(solution):
        if match.start() > position:
            parts.append({"type": "text", "text": solution[position:match.start()]})
        parts.append({"type": "python", "text": match.group(1)})
        parts.append({"type": "python_output", "text": match.group(2)})
        position = match.end()
    if position < len(solution):
        parts.append({"type": "text", "text": solution[position:]})
    return parts


def gsm8k_conversation(question: str, solution: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": tool_call_parts(solution)},
        ],
        "answer": extract_answer(solution),
    }


class FinalNumberTask(Task):
    """Generative tasks whose reply ends with '#### <number>', graded by that number alone."""

    @property
    def eval_type(self) -> str:
        return "generative"

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        return int(same_number(extract_answer(assistant_response), conversation["answer"]))


class GSM8K(FinalNumberTask):
    def __init__(self, subset: str = "main", split: str = "train", **kwargs):
        super().__init__(**kwargs)
        check_choice("GSM8K subset", subset, SUBSETS)
        check_choice("GSM8K split", split, SPLITS)
        self.table = load_parquet(
            "gsm8k", "openai/gsm8k", [f"{subset}/{split}-00000-of-00001.parquet"], ["question", "answer"],
            standin="arithmetic-standin",
        )

    def num_examples(self) -> int:
        return self.table.num_rows

    def get_example(self, index: int) -> dict:
        r = row(self.table, index)
        return gsm8k_conversation(r["question"], r["answer"])
