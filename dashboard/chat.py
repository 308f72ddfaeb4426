"""Chat with a checkpoint of a run: the model is loaded once per checkpoint, and its reply streams as text.

The calculator's special tokens are not shown as they are: a call
<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> shows as 🧮 `12*7` → `84`. The model's own
text is shown verbatim: Markdown would eat the `*` of 7*7 and make `#### 34` a heading.
"""

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import requests
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


MARKER = re.compile(r"<\|(python_start|python_end|output_start|output_end)\|>")


def display(raw: str) -> str:
    """A reply's text with its calculator markers, as the page shows it (Markdown): the text verbatim, each call as
    🧮 `expression` → `result`, set apart from the model's own copy of the result that usually follows.

    A call shows once its <|python_end|> arrives and its result once <|output_end|> does, so the text of a
    growing reply only ever grows at the end. The in-process model's tokens and the chat server's text both
    carry the markers as they are (the tokenizer decodes them as text).
    """
    pieces, inside, start = [], None, 0  # inside: the open marker, if any; start: where the text not yet shown begins

    def text(chunk: str) -> str:  # a space keeps "→ `64`" apart from the model's own "64 dollars"
        shown = verbatim(chunk)
        return f" {shown}" if pieces and pieces[-1].startswith(" → ") and shown[:1].isalnum() else shown

    for m in MARKER.finditer(raw):
        chunk, marker = raw[start:m.start()], m.group(1)
        if marker in ("python_start", "output_start"):
            if inside is None:
                pieces.append(text(chunk))
            inside, start = marker, m.end()
        elif marker == "python_end" and inside == "python_start":
            space = " " if pieces and pieces[-1] and not pieces[-1][-1].isspace() else ""
            pieces.append(f"{space}🧮 `{chunk}`")
            inside, start = None, m.end()
        elif marker == "output_end" and inside == "output_start":
            pieces.append(f" → `{chunk}`")
            inside, start = None, m.end()
        # any other marker is out of place: it stays in the text
    if inside is None:
        pieces.append(text(raw[start:]))
    return "".join(pieces)


def display_text(tokenizer, tokens: list[int]) -> str:
    """Reply tokens as the page shows them: display() of their text."""
    return display(tokenizer.decode(tokens))


def stream_reply(chat_model: ChatModel, tokens: list[int], reply: list[int], temperature: float, top_k: int,
                 max_tokens: int) -> Iterator[str]:
    """Generate the reply to `tokens`, yielding its new shown text at each step; `reply` collects its tokens (the
    stop token left out)."""
    engine = chat_model.engine

    def texts() -> Iterator[str]:
        with chat_model.lock:
            for column, _ in engine.generate(tokens, max_tokens=max_tokens, temperature=temperature, top_k=top_k):
                if column[0] in engine.stop_tokens:
                    return
                reply.append(column[0])
                yield engine.tokenizer.decode(reply)

    return _new_text(texts())


def server_models(serve_url: str) -> list[str]:
    """The models an OpenAI-compatible chat server serves (GET /v1/models)."""
    return [model["id"] for model in _server_call("GET", serve_url, "/v1/models").json()["data"]]


def stream_from_server(serve_url: str, model: str, messages: list[dict], reply: list[str], temperature: float,
                       top_k: int) -> Iterator[str]:
    """The reply of an OpenAI-compatible chat server to `messages`, streamed (server-sent events, OpenAI's chunk
    format, up to `data: [DONE]`): its new shown text at each chunk; `reply` collects the text as sent. The length
    is the server's to choose: it knows how much room the model's context has left."""
    body = {"model": model, "messages": messages, "stream": True, "temperature": temperature, "top_k": top_k}

    def texts() -> Iterator[str]:
        with _server_call("POST", serve_url, "/v1/chat/completions", json=body, stream=True) as response:
            for line in response.iter_lines(decode_unicode=True):
                if not line.startswith("data:"):
                    continue  # a blank line between events, or a comment
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise VibechatError(f"the chat server at {serve_url} failed mid-reply: {chunk['error']}")
                reply.append(chunk["choices"][0]["delta"].get("content") or "")
                yield "".join(reply)
        raise VibechatError(f"the chat server at {serve_url} ended its stream without data: [DONE]")

    return _new_text(texts())


def _server_call(method: str, serve_url: str, path: str, **kwargs) -> requests.Response:
    """One request to the chat server; a refusal or no answer is one VibechatError naming the server."""
    try:
        response = requests.request(method, serve_url.rstrip("/") + path, timeout=(5, 300), **kwargs)
    except requests.RequestException as e:
        raise VibechatError(f"cannot reach the chat server at {serve_url} ({type(e).__name__}): check "
                            "VIBECHAT_SERVE_URL and that `python -m jobs.chat_server` runs there") from None
    if response.status_code != 200:
        try:
            reason = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = response.text[:200]
        raise VibechatError(f"the chat server at {serve_url} answered {response.status_code}: {reason}")
    return response


def _new_text(texts: Iterator[str]) -> Iterator[str]:
    """From the raw text of a growing reply, what to append to the shown Markdown each time it grows."""
    shown, raw = "", ""
    for raw in texts:
        text = display(raw).rstrip("\ufffd")  # a character whose bytes are not all here yet
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    rest = display(raw)[len(shown):]
    if rest:
        yield rest
