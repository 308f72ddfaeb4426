"""Conversations from a JSONL file of your own: one conversation per line.

A line is {"messages": [...]} or just the list of messages; each message is
{"role": "system" | "user" | "assistant", "content": ...} as described in tasks/common.py:
an optional system message, then user and assistant taking turns.
"""

import json
import os

from tasks.common import Task
from vibechat.common import VibechatError
from vibechat.tokenizer import chat_messages


class CustomJSON(Task):
    def __init__(self, filepath: str, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath
        try:
            with open(filepath, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError as e:
            raise VibechatError(f"cannot read conversations file {filepath}: {e.strerror}") from None
        self.conversations = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                conversation = json.loads(line)
                if isinstance(conversation, list):
                    conversation = {"messages": conversation}
                chat_messages(conversation)  # raises, saying what is wrong with the messages
            except (json.JSONDecodeError, VibechatError) as e:
                problem = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                raise VibechatError(f"{filepath}, line {lineno}: {problem}; fix or remove that line") from None
            self.conversations.append(conversation)

    @property
    def name(self) -> str:
        return f"CustomJSON({os.path.basename(self.filepath)})"

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]
