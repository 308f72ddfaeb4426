"""Chat with a checkpoint of a run: the model is loaded once per checkpoint, and its reply streams as text.

The calculator's special tokens are not shown as they are: a call
<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> shows as 🧮 `12*7` → `84`. The model's own
text is shown verbatim: Markdown would eat the `*` of 7*7 and make `#### 34` a heading.
"""

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import streamlit as st
import torch

from vibechat.checkpoint_manager import build_model, load_checkpoint
from vibechat.common import VibechatError, autocast_dtype, autodetect_device_type
from vibechat.engine import Engine
from vibechat.layout import TOKENIZER_DIR, checkpoint_dir, join
from vibechat.tokenizer import RustBPETokenizer


@dataclass
class ChatModel:
    engine: Engine
    lock: threading.Lock  # an Engine runs one generation at a time, and every session of the dashboard shares it
    device: torch.device
    is_chat: bool  # a base model continues text; the later phases answer in conversation turns


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def load_chat_model(run_url: str, stage: str, model_tag: str, step: int) -> ChatModel:
    """The model of <run>/checkpoints/<stage>/<model_tag> at `step` and the run's tokenizer, on the GPU if any."""
    device = torch.device(autodetect_device_type())
    model_data, _, meta = load_checkpoint(join(run_url, checkpoint_dir(stage, model_tag)), step, device)
    model = build_model(model_data, meta, device, "eval")
    model.to(dtype=autocast_dtype(device))  # bf16 on GPU: decoding reads every weight once per token
    tokenizer = RustBPETokenizer.from_directory(join(run_url, TOKENIZER_DIR))
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise VibechatError(f"the run's tokenizer has {tokenizer.get_vocab_size()} tokens but the {stage} model "
                            f"expects {model.config.vocab_size}: checkpoint and tokenizer are from different runs")
    return ChatModel(Engine(model, tokenizer), threading.Lock(), device, stage != "base")


def prompt_tokens(chat_model: ChatModel, conversation: list[int], text: str) -> list[int]:
    """The tokens that ask for a reply to `text`: the conversation's next turn, or for a base model the text alone."""
    tokenizer = chat_model.engine.tokenizer
    if not chat_model.is_chat:
        return [tokenizer.get_bos_token_id(), *tokenizer.encode(text)]
    special = tokenizer.encode_special
    return [*conversation, special("<|user_start|>"), *tokenizer.encode(text), special("<|user_end|>"),
            special("<|assistant_start|>")]


def verbatim(text: str) -> str:
    """Markdown that shows text as it is: inline marks (* _ ` # $ ...) and line-leading list or quote marks
    escaped, line breaks kept."""
    text = re.sub(r"([\\`*_\[\]<#|~$])", r"\\\1", text)
    text = re.sub(r"(?m)^(\s*)([-+=>]|\d+[.)])", lambda m: f"{m.group(1)}{m.group(2)[:-1]}\\{m.group(2)[-1]}", text)
    return text.replace("\n", "  \n")


def display_text(tokenizer, tokens: list[int]) -> str:
    """Reply tokens as the page shows them (Markdown): the text verbatim, each calculator call as
    🧮 `expression` → `result` set apart from the model's own copy of the result that usually follows.

    A call shows once its <|python_end|> arrives and its result once <|output_end|> does, so the text of a
    growing reply only ever grows at the end.
    """
    special = tokenizer.encode_special
    python_start, python_end = special("<|python_start|>"), special("<|python_end|>")
    output_start, output_end = special("<|output_start|>"), special("<|output_end|>")
    pieces, run, inside = [], [], None  # run: tokens since the last marker; inside: the open marker, if any

    def text(run: list[int]) -> str:  # a space keeps "→ `64`" apart from the model's own "64 dollars"
        shown = verbatim(tokenizer.decode(run))
        return f" {shown}" if pieces and pieces[-1].startswith(" → ") and shown[:1].isalnum() else shown

    for token in tokens:
        if token in (python_start, output_start):
            if inside is None:
                pieces.append(text(run))
            run, inside = [], token
        elif token == python_end and inside == python_start:
            space = " " if pieces and pieces[-1] and not pieces[-1][-1].isspace() else ""
            pieces.append(f"{space}🧮 `{tokenizer.decode(run)}`")
            run, inside = [], None
        elif token == output_end and inside == output_start:
            pieces.append(f" → `{tokenizer.decode(run)}`")
            run, inside = [], None
        else:
            run.append(token)
    if inside is None:
        pieces.append(text(run))
    return "".join(pieces)


def stream_reply(chat_model: ChatModel, tokens: list[int], reply: list[int], temperature: float, top_k: int,
                 max_tokens: int) -> Iterator[str]:
    """Generate the reply to `tokens`, yielding its new text at each step; `reply` collects its tokens (the
    stop token left out)."""
    engine = chat_model.engine
    shown = ""
    with chat_model.lock:
        for column, _ in engine.generate(tokens, max_tokens=max_tokens, temperature=temperature, top_k=top_k):
            token = column[0]
            if token in engine.stop_tokens:
                break
            reply.append(token)
            text = display_text(engine.tokenizer, reply).rstrip("\ufffd")  # a character whose bytes are not all here
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text
    rest = display_text(engine.tokenizer, reply)[len(shown):]
    if rest:
        yield rest
