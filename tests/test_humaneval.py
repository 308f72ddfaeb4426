"""HumanEval: the shipped problems, graded by running their tests in vibechat.execution's sandbox."""

from concurrent.futures import ThreadPoolExecutor

from tasks.humaneval import HumanEval, extract_code


def test_all_164_problems_ship_with_the_package():
    task = HumanEval()
    assert len(task) == 164 and task.name == "HumanEval" and task.eval_type == "generative"
    assert task[0]["task_id"] == "HumanEval/0" and task[163]["task_id"] == "HumanEval/163"


def test_every_canonical_solution_passes_in_the_sandbox():
    task = HumanEval()

    def grade(index: int) -> tuple[str, int]:
        conversation = task[index]
        return conversation["task_id"], task.evaluate(conversation, conversation["messages"][1]["content"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(grade, range(len(task))))
    assert [task_id for task_id, passed in results.items() if not passed] == []


def test_an_empty_body_fails():
    task = HumanEval()
    conversation = task[0]
    assert task.evaluate(conversation, "") == 0
    assert task.evaluate(conversation, "    pass\n") == 0


def test_a_wrong_solution_fails():
    task = HumanEval()
    conversation = task[2]  # truncate_number(3.5) == 0.5
    assert task.evaluate(conversation, "    return number\n") == 0


def test_the_body_alone_completes_the_prompt():
    task = HumanEval()
    conversation = task[2]  # truncate_number: the prompt's signature is kept
    body = conversation["messages"][1]["content"][len(conversation["prompt"]):]
    assert task.evaluate(conversation, body) == 1


def test_code_is_taken_from_a_python_block_in_a_chatty_reply():
    task = HumanEval()
    conversation = task[2]
    solution = conversation["messages"][1]["content"]
    reply = f"Here is my solution:\n\n```python\n{solution}```\n\nIt returns the decimal part."
    assert extract_code(reply) == solution
    assert task.evaluate(conversation, reply) == 1
    assert task.evaluate(conversation, "Here is my solution: return number % 1.0") == 0
