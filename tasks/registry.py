"""Tasks by name, so that presets (which are data) can choose them: get_task("gsm8k", split="test").

The public datasets download into the store on first use; the "-standin" tasks are generated
offline in the same formats, and report under their own names.
"""

import inspect
import os

from tasks.arc import ARC
from tasks.common import Task
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tasks.standins import (StandinArithmetic, StandinConversations, StandinMultipleChoice,
                            StandinMultipleChoiceGenerative)
from vibechat.common import VibechatError

IDENTITY_PATH = os.path.join(os.path.dirname(__file__), "data", "identity.jsonl")

# name -> (task class, the arguments the name fixes)
TASKS = {
    "arc-easy": (ARC, {"subset": "ARC-Easy"}),
    "arc-challenge": (ARC, {"subset": "ARC-Challenge"}),
    "mmlu": (MMLU, {"subset": "all"}),
    "mmlu-auxiliary-train": (MMLU, {"subset": "auxiliary_train", "split": "train"}),
    "gsm8k": (GSM8K, {}),
    "smoltalk": (SmolTalk, {}),
    "humaneval": (HumanEval, {}),
    "spellingbee": (SpellingBee, {}),
    "simplespelling": (SimpleSpelling, {}),
    "identity": (CustomJSON, {"filepath": IDENTITY_PATH}),
    "customjson": (CustomJSON, {}),
    "arithmetic-standin": (StandinArithmetic, {}),
    "multiple-choice-standin": (StandinMultipleChoice, {}),
    "multiple-choice-standin-generative": (StandinMultipleChoiceGenerative, {}),
    "conversations-standin": (StandinConversations, {}),
}


def task_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments a task class takes: its own, then the slice arguments of Task."""
    params = {}
    for klass in (cls, Task):
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(p.name, p)
    return params


def get_task(name: str, **kwargs) -> Task:
    """The task registered as `name`, built with kwargs (split, size, start/stop/step...)."""
    if name not in TASKS:
        raise VibechatError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    cls, fixed = TASKS[name]
    params = task_parameters(cls)
    allowed = [p for p in params if p not in fixed]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise VibechatError(f"task {name!r} takes no argument {', '.join(unknown)}; it takes {', '.join(allowed)}")
    missing = [p for p in allowed if params[p].default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise VibechatError(f"task {name!r} needs the argument(s) {', '.join(missing)}")
    return cls(**fixed, **kwargs)
