"""BPE tokenizers: trained with rustbpe and run with tiktoken (the one vibechat uses), or the HuggingFace
`tokenizers` library (same API, for comparison). Both render chat conversations into ids and a training mask.

A tokenizer directory (a local path or a store URL such as s3://bucket/runs/r1/tokenizer) holds
tokenizer.pkl (or tokenizer.json for HuggingFace) and token_bytes.pt.
"""

import io
import pickle
from collections.abc import Iterable

import tiktoken
import torch

from vibechat.common import VibechatError, get_base_dir
from vibechat.layout import TOKENIZER_DIR
from vibechat.storage import open_store

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, written back into the conversation
    "<|output_end|>",
]

# GPT-4's split pattern, except numbers split into groups of at most 2 digits (not 3): small vocabularies
# waste fewer tokens on the 1000 three-digit numbers.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class TokenizerError(VibechatError):
    """A tokenizer could not be trained, loaded, or asked to encode something."""


# ----------------------------------------------------------------------------------------------------------


class ChatTokenizer:
    """What both tokenizers share: encode with prepend/append, and rendering conversations."""

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation; mask is 1 on the tokens the assistant is trained to produce."""
        ids, mask = self._render(chat_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The conversation without its last (assistant) message, then <|assistant_start|>: the model goes on."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise TokenizerError(
                "render_for_completion needs a conversation whose last message is the assistant's "
                "(it is dropped and the model writes it)"
            )
        ids, _ = self._render(chat_messages({"messages": messages[:-1]}))
        return ids + [self.encode_special("<|assistant_start|>")]

    def _render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        ids, mask = [], []

        def add(tokens: int | list[int], train: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([train] * len(tokens))

        special = self.encode_special
        add(self.get_bos_token_id(), 0)
        for message in messages:
            if message["role"] == "user":
                add(special("<|user_start|>"), 0)
                add(self.encode(message["content"]), 0)
                add(special("<|user_end|>"), 0)
                continue
            add(special("<|assistant_start|>"), 0)
            content = message["content"]
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":
                    add(special("<|python_start|>"), 1)
                    add(self.encode(part["text"]), 1)
                    add(special("<|python_end|>"), 1)
                else:  # python_output: written by the tool, so never trained on
                    add(special("<|output_start|>"), 0)
                    add(self.encode(part["text"]), 0)
                    add(special("<|output_end|>"), 0)
            add(special("<|assistant_end|>"), 1)
        return ids, mask

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """Ids of a str, or a list of ids per str of a list; prepend/append are special-token names or ids.

        Special-token strings inside the text are plain text: only encode_special, prepend and append make
        special ids.
        """
        first = [self._id(prepend)] if prepend is not None else []
        last = [self._id(append)] if append is not None else []
        if isinstance(text, str):
            return first + self.encode_ordinary(text) + last
        if isinstance(text, list):
            return [first + ids + last for ids in self.encode_ordinary_batch(text, num_threads)]
        raise TokenizerError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def _id(self, token: int | str) -> int:
        return token if isinstance(token, int) else self.encode_special(token)

    # implemented by each tokenizer
    def encode_ordinary(self, text: str) -> list[int]: ...
    def encode_ordinary_batch(self, texts: list[str], num_threads: int) -> list[list[int]]: ...
    def encode_special(self, text: str) -> int: ...
    def get_bos_token_id(self) -> int: ...
    def get_vocab_size(self) -> int: ...
    def get_special_tokens(self) -> set[str]: ...
    def decode_token_bytes(self, token_id: int) -> bytes: ...


PART_TYPES = ("text", "python", "python_output")


def chat_messages(conversation: dict) -> list[dict]:
    """The messages of a conversation, checked, with a leading system message merged into the first user turn."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("a conversation must be a dict with a non-empty 'messages' list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TokenizerError(f"message {i} must be a dict with 'role' and 'content'")
    offset = 0
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user" or not isinstance(messages[1]["content"], str):
            raise TokenizerError("message 1 must be a user message with text: a system message is merged into it")
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages, offset = [merged] + messages[2:], 1
    for i, message in enumerate(messages):
        index, role, content = i + offset, message["role"], message["content"]
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise TokenizerError(
                f"message {index} has role {role!r} where {expected!r} was expected: "
                "roles must alternate user/assistant, starting with user (a system message may come first)"
            )
        if role == "user" and not isinstance(content, str):
            raise TokenizerError(f"message {index} (user) must have string content")
        if role == "assistant" and not isinstance(content, str):
            parts_ok = isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") in PART_TYPES and isinstance(p.get("text"), str) for p in content
            )
            if not parts_ok:
                raise TokenizerError(
                    f"message {index} (assistant) must have string content or a list of parts "
                    f"{{'type': one of {PART_TYPES}, 'text': str}}"
                )
    return messages


# ----------------------------------------------------------------------------------------------------------
# training input checks, shared by both trainers


def check_vocab_size(vocab_size: int) -> None:
    smallest = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise TokenizerError(
            f"vocab size {vocab_size} is too small: it must hold the 256 byte tokens and "
            f"{len(SPECIAL_TOKENS)} special tokens, so at least {smallest}"
        )


class CountingTexts:
    """Hands training texts to a trainer, checking each is a str and keeping count, so a bad one can be named."""

    def __init__(self, texts: Iterable[str]):
        self.texts = iter(texts)
        self.index = -1
        self.chars = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        text = next(self.texts)
        self.index += 1
        if not isinstance(text, str):
            raise TokenizerError(
                f"training text {self.index} is {type(text).__name__}, not str: decode bytes as UTF-8 first"
            )
        self.chars += len(text)
        return text

    def not_utf8(self, error: Exception) -> TokenizerError:
        return TokenizerError(f"training text {self.index} is not valid UTF-8 text ({error}): drop or repair it")

    def check_trained(self, vocab_size: int, trained: int) -> None:
        if self.chars == 0:
            raise TokenizerError("the training corpus is empty: prepare the data first (python -m jobs.data)")
        if trained < vocab_size:
            raise TokenizerError(
                f"the corpus ({self.chars:,} chars) only supports a vocabulary of {trained} tokens, "
                f"not {vocab_size}: give more text (--max-chars) or a smaller --vocab-size"
            )


# ----------------------------------------------------------------------------------------------------------
# rustbpe + tiktoken


class PlainDataUnpickler(pickle.Unpickler):
    """tokenizer.pkl holds only dicts, strs, bytes and ints; refusing classes means a tampered store can't run code."""

    def find_class(self, module, name):
        raise TokenizerError(f"tokenizer.pkl refers to {module}.{name}: not a vibechat tokenizer file")


class RustBPETokenizer(ChatTokenizer):
    """Trained with rustbpe, encodes and decodes with tiktoken."""

    def __init__(self, enc: tiktoken.Encoding, bos_token: str = "<|bos|>"):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator: Iterable[str], vocab_size: int) -> "RustBPETokenizer":
        import rustbpe

        check_vocab_size(vocab_size)
        texts = CountingTexts(text_iterator)
        trainer = rustbpe.Tokenizer()
        num_ordinary = vocab_size - len(SPECIAL_TOKENS)  # the special tokens come after the merges
        try:
            trainer.train_from_iterator(texts, num_ordinary, pattern=SPLIT_PATTERN)
        except UnicodeEncodeError as e:
            raise texts.not_utf8(e) from None
        texts.check_trained(vocab_size, trainer.vocab_size + len(SPECIAL_TOKENS))
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        special_tokens = {name: num_ordinary + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(
            name="vibechat", pat_str=SPLIT_PATTERN, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        return cls(enc)

    @classmethod
    def from_directory(cls, tokenizer_dir: str) -> "RustBPETokenizer":
        store = open_store(tokenizer_dir)
        try:
            data = store.get_bytes("tokenizer.pkl")
        except FileNotFoundError:
            raise TokenizerError(
                f"no tokenizer at {store.uri('tokenizer.pkl')}: train one first (python -m jobs.tok_train)"
            ) from None
        try:
            state = PlainDataUnpickler(io.BytesIO(data)).load()
            enc = tiktoken.Encoding(**state)
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as e:
            raise TokenizerError(
                f"{store.uri('tokenizer.pkl')} is not a readable tokenizer ({e}): retrain it (python -m jobs.tok_train)"
            ) from None
        return cls(enc, "<|bos|>" if "<|bos|>" in enc.special_tokens_set else "<|endoftext|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name: str) -> "RustBPETokenizer":
        """A tiktoken encoding such as "gpt2" or "cl100k_base"; tiktoken downloads it on first use."""
        try:
            enc = tiktoken.get_encoding(tiktoken_name)
        except (OSError, ValueError) as e:  # requests' errors are OSErrors
            raise TokenizerError(
                f"tiktoken encoding {tiktoken_name!r} could not be loaded ({type(e).__name__}): tiktoken downloads "
                "it on first use, so offline it needs a copy in $TIKTOKEN_CACHE_DIR"
            ) from None
        return cls(enc, "<|endoftext|>")  # GPT-2/GPT-4 delimit documents with <|endoftext|>

    def save(self, tokenizer_dir: str) -> None:
        open_store(tokenizer_dir).put_bytes("tokenizer.pkl", pickle.dumps(self.enc.__getstate__()))

    def encode_ordinary(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def decode_token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def encode_special(self, text: str) -> int:
        if text not in self.enc.special_tokens_set:
            raise TokenizerError(f"{text!r} is not a special token of this tokenizer")
        return self.enc.encode_single_token(text)

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> set[str]:
        return set(self.enc.special_tokens_set)


# ----------------------------------------------------------------------------------------------------------
# HuggingFace tokenizers


def byte_level_chars() -> dict[str, int]:
    """HuggingFace's byte-level alphabet: each byte stands in as a printable char (itself if printable,
    else 256 + n); returns char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in chars.values()]
    chars.update({chr(256 + n): b for n, b in enumerate(others)})
    return chars


BYTE_OF_CHAR = byte_level_chars()


class HuggingFaceTokenizer(ChatTokenizer):
    """The same tokenizer built with the HuggingFace `tokenizers` library (special tokens get ids 0..8)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # special-token strings in text are plain text

    @classmethod
    def train_from_iterator(cls, text_iterator: Iterable[str], vocab_size: int) -> "HuggingFaceTokenizer":
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

        check_vocab_size(vocab_size)
        tokenizer = Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False, min_frequency=0,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL_TOKENS,
        )
        texts = CountingTexts(text_iterator)
        try:
            tokenizer.train_from_iterator(texts, trainer)
        except UnicodeEncodeError as e:
            raise texts.not_utf8(e) from None
        texts.check_trained(vocab_size, tokenizer.get_vocab_size())
        return cls(tokenizer)

    @classmethod
    def from_directory(cls, tokenizer_dir: str) -> "HuggingFaceTokenizer":
        from tokenizers import Tokenizer

        store = open_store(tokenizer_dir)
        try:
            text = store.get_text("tokenizer.json")
        except FileNotFoundError:
            raise TokenizerError(f"no tokenizer at {store.uri('tokenizer.json')}: train and save one first") from None
        try:
            return cls(Tokenizer.from_str(text))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise TokenizerError(f"{store.uri('tokenizer.json')} is not a readable tokenizer ({e})") from None

    @classmethod
    def from_pretrained(cls, hf_path: str) -> "HuggingFaceTokenizer":
        """A tokenizer from the HuggingFace hub (downloads; offline it needs the hub cache)."""
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_pretrained(hf_path))
        except Exception as e:
            raise TokenizerError(f"HuggingFace tokenizer {hf_path!r} could not be loaded ({e})") from None

    def save(self, tokenizer_dir: str) -> None:
        open_store(tokenizer_dir).put_text("tokenizer.json", self.tokenizer.to_str())

    def encode_ordinary(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        # tokenizers sizes its own thread pool (RAYON_NUM_THREADS), so num_threads is unused
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode_token_bytes(self, token_id: int) -> bytes:
        return bytes(BYTE_OF_CHAR[c] for c in self.tokenizer.id_to_token(token_id))

    def encode_special(self, text: str) -> int:
        if text not in self.get_special_tokens():
            raise TokenizerError(f"{text!r} is not a special token of this tokenizer")
        return self.tokenizer.token_to_id(text)

    def get_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def get_bos_token_id(self) -> int:
        return self.encode_special("<|bos|>")

    def get_special_tokens(self) -> set[str]:
        return {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}


# ----------------------------------------------------------------------------------------------------------
# token bytes (for bits per byte) and the default tokenizer of a run


def compute_token_bytes(tokenizer: ChatTokenizer) -> torch.Tensor:
    """(vocab_size,) int32: the UTF-8 byte length of each token, 0 for special tokens (they stand for no text)."""
    special = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    lengths = [0 if i in special else len(tokenizer.decode_token_bytes(i)) for i in range(tokenizer.get_vocab_size())]
    return torch.tensor(lengths, dtype=torch.int32)


def save_token_bytes(tokenizer: ChatTokenizer, tokenizer_dir: str) -> torch.Tensor:
    token_bytes = compute_token_bytes(tokenizer)
    buffer = io.BytesIO()
    torch.save(token_bytes, buffer)
    open_store(tokenizer_dir).put_bytes("token_bytes.pt", buffer.getvalue())
    return token_bytes


def default_tokenizer_dir() -> str:
    return open_store(get_base_dir()).uri(TOKENIZER_DIR)


def get_tokenizer() -> RustBPETokenizer:
    """The tokenizer of this run: <base dir>/tokenizer."""
    return RustBPETokenizer.from_directory(default_tokenizer_dir())


def get_token_bytes(device: str | torch.device = "cpu") -> torch.Tensor:
    store = open_store(default_tokenizer_dir())
    try:
        data = store.get_bytes("token_bytes.pt")
    except FileNotFoundError:
        raise TokenizerError(
            f"no {store.uri('token_bytes.pt')}: train the tokenizer first (python -m jobs.tok_train)"
        ) from None
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
