"""The tokenizers: training, encoding, special tokens, conversation rendering, saving and loading."""

import json
import os
import pickle
import re
import sysconfig

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vibechat.common import VibechatError
from vibechat.dataset import pydocs_documents
from vibechat.tokenizer import (
    BYTE_OF_CHAR,
    SPECIAL_TOKENS,
    HuggingFaceTokenizer,
    RustBPETokenizer,
    compute_token_bytes,
    get_token_bytes,
    get_tokenizer,
    save_token_bytes,
)

VOCAB_SIZE = 512


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Real English text: the docstrings of the standard library's email package (~100K chars)."""
    return pydocs_documents(os.path.join(sysconfig.get_paths()["stdlib"], "email"))


@pytest.fixture(scope="module")
def rust_tokenizer(corpus) -> RustBPETokenizer:
    return RustBPETokenizer.train_from_iterator(corpus, VOCAB_SIZE)


@pytest.fixture(scope="module")
def hf_tokenizer(corpus) -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer.train_from_iterator(corpus, VOCAB_SIZE)


@pytest.fixture(params=["rustbpe", "huggingface"])
def tokenizer(request, rust_tokenizer, hf_tokenizer):
    return rust_tokenizer if request.param == "rustbpe" else hf_tokenizer


def test_trained_vocabulary_has_the_asked_size_with_special_tokens(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert tokenizer.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tokenizer.get_bos_token_id() == tokenizer.encode_special("<|bos|>")


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_encode_decode_round_trips_any_unicode(rust_tokenizer, hf_tokenizer, text):
    for tokenizer in (rust_tokenizer, hf_tokenizer):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_split_into_groups_of_at_most_two(rust_tokenizer):
    pieces = [rust_tokenizer.decode([i]) for i in rust_tokenizer.encode("x 12345")]
    assert all(len(p) <= 2 for p in pieces if p.strip().isdigit())
    assert "".join(pieces) == "x 12345"


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), st.text(max_size=5)), max_size=8))
def test_plain_text_never_encodes_to_special_tokens(rust_tokenizer, hf_tokenizer, pieces):
    text = "".join(pieces)
    for tokenizer in (rust_tokenizer, hf_tokenizer):
        special_ids = {tokenizer.encode_special(s) for s in SPECIAL_TOKENS}
        ids = tokenizer.encode(text)
        assert not special_ids & set(ids)
        assert tokenizer.decode(ids) == text


def test_special_tokens_survive_a_round_trip(tokenizer):
    ids = tokenizer.encode(["Hello", "world"], prepend="<|bos|>", append=tokenizer.encode_special("<|assistant_end|>"))
    for row in ids:
        assert row[0] == tokenizer.get_bos_token_id()
        assert row[-1] == tokenizer.encode_special("<|assistant_end|>")
    assert tokenizer.decode(ids[0]) == "<|bos|>Hello<|assistant_end|>"
    for name in SPECIAL_TOKENS:
        token_id = tokenizer.encode_special(name)
        assert tokenizer.decode([token_id]) == name


def test_batch_encoding_equals_one_by_one(tokenizer, corpus):
    assert tokenizer.encode(corpus[:8], num_threads=2) == [tokenizer.encode(t) for t in corpus[:8]]


def rust_merges(tokenizer: RustBPETokenizer) -> list[bytes]:
    """The merged tokens, in the order they were learned (tiktoken's rank order)."""
    special = {tokenizer.encode_special(s) for s in SPECIAL_TOKENS}
    ordinary = [i for i in range(tokenizer.get_vocab_size()) if i not in special]
    return [tokenizer.decode_token_bytes(i) for i in ordinary][256:]


def hf_merges(tokenizer: HuggingFaceTokenizer) -> list[bytes]:
    merges = json.loads(tokenizer.tokenizer.to_str())["model"]["merges"]
    return [bytes(BYTE_OF_CHAR[c] for c in left + right) for left, right in merges]


def test_rustbpe_and_huggingface_learn_the_same_merges(corpus):
    """Both trainers take the most frequent pair, breaking count ties by the smaller pair of ids. HuggingFace
    numbers the 256 bytes by their printable stand-in chars, so its id order differs from byte order for
    whitespace and non-ASCII bytes (a space sorts after 'z'): ties among those may go either way. On text of
    printable ASCII without whitespace the two id orders agree, so the merges must agree exactly."""
    words = [w for text in corpus for w in text.split() if all(33 <= ord(c) <= 126 for c in w)]
    rust = RustBPETokenizer.train_from_iterator(words, VOCAB_SIZE)
    hf = HuggingFaceTokenizer.train_from_iterator(words, VOCAB_SIZE)
    assert len(rust_merges(rust)) == VOCAB_SIZE - 256 - len(SPECIAL_TOKENS)
    assert rust_merges(rust) == hf_merges(hf)
    # the same merges encode any text (whitespace and all) into the same tokens
    for text in corpus[:5] + ["naïve café: 3.14159 μs\r\n\tdone"]:
        rust_tokens = [rust.decode_token_bytes(i) for i in rust.encode(text)]
        hf_tokens = [hf.decode_token_bytes(i) for i in hf.encode(text)]
        assert rust_tokens == hf_tokens


# ----------------------------------------------------------------------------------------------------------
# conversations

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": "It is 42."},
    ]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]}


def test_render_conversation_masks_exactly_the_assistants_own_tokens(tokenizer):
    ids, mask = tokenizer.render_conversation(CONVERSATION)
    special, text = tokenizer.encode_special, tokenizer.encode
    expected = (
        [(special("<|bos|>"), 0), (special("<|user_start|>"), 0)]
        + [(i, 0) for i in text("Be brief.\n\nWhat is 6*7?")]  # the system message opens the first user turn
        + [(special("<|user_end|>"), 0), (special("<|assistant_start|>"), 0)]
        + [(i, 1) for i in text("Let me compute.")]
        + [(special("<|python_start|>"), 1)] + [(i, 1) for i in text("6*7")] + [(special("<|python_end|>"), 1)]
        + [(special("<|output_start|>"), 0)] + [(i, 0) for i in text("42")] + [(special("<|output_end|>"), 0)]
        + [(i, 1) for i in text("It is 42.")]
        + [(special("<|assistant_end|>"), 1)]
        + [(special("<|user_start|>"), 0)] + [(i, 0) for i in text("Thanks")] + [(special("<|user_end|>"), 0)]
        + [(special("<|assistant_start|>"), 0)] + [(i, 1) for i in text("You're welcome.")]
        + [(special("<|assistant_end|>"), 1)]
    )
    assert list(zip(ids, mask)) == expected


def test_render_conversation_truncates_at_max_tokens(tokenizer):
    full_ids, full_mask = tokenizer.render_conversation(CONVERSATION)
    ids, mask = tokenizer.render_conversation(CONVERSATION, max_tokens=10)
    assert (ids, mask) == (full_ids[:10], full_mask[:10])


def test_render_for_completion_drops_the_last_answer_and_primes_the_assistant(tokenizer):
    ids = tokenizer.render_for_completion(CONVERSATION)
    full_ids, _ = tokenizer.render_conversation(CONVERSATION)
    answer = tokenizer.encode("You're welcome.")
    assert ids[-1] == tokenizer.encode_special("<|assistant_start|>")
    assert ids == full_ids[: len(ids)]
    assert full_ids[len(ids):] == answer + [tokenizer.encode_special("<|assistant_end|>")]


@pytest.mark.parametrize("messages, index", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 1),
    ([{"role": "assistant", "content": "a"}], 0),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 2),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "robot", "content": "c"}], 2),
])
def test_roles_that_do_not_alternate_name_the_message(rust_tokenizer, messages, index):
    with pytest.raises(VibechatError, match=f"message {index} has role"):
        rust_tokenizer.render_conversation({"messages": messages})


def test_an_unknown_assistant_part_is_an_error_naming_the_message(rust_tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]
    with pytest.raises(VibechatError, match="message 1 .*list of parts"):
        rust_tokenizer.render_conversation({"messages": messages})


def test_render_for_completion_needs_a_final_assistant_message(rust_tokenizer):
    with pytest.raises(VibechatError, match="last message is the assistant's"):
        rust_tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


# ----------------------------------------------------------------------------------------------------------
# saving, loading, token bytes


def test_save_and_load_gives_the_same_tokenizer(rust_tokenizer, tmp_path, corpus):
    rust_tokenizer.save(str(tmp_path))
    loaded = RustBPETokenizer.from_directory(str(tmp_path))
    assert loaded.encode(corpus[:3]) == rust_tokenizer.encode(corpus[:3])
    assert loaded.get_bos_token_id() == rust_tokenizer.get_bos_token_id()


def test_huggingface_save_and_load_gives_the_same_tokenizer(hf_tokenizer, tmp_path, corpus):
    hf_tokenizer.save(str(tmp_path))
    loaded = HuggingFaceTokenizer.from_directory(str(tmp_path))
    assert loaded.encode(corpus[:3]) == hf_tokenizer.encode(corpus[:3])
    assert loaded.encode("<|bos|>") != [loaded.get_bos_token_id()]  # still plain text after loading


def test_tokenizer_loads_from_an_s3_directory(rust_tokenizer, s3_url):
    rust_tokenizer.save(s3_url + "/tokenizer")
    loaded = RustBPETokenizer.from_directory(s3_url + "/tokenizer")
    assert loaded.encode("round trip via S3") == rust_tokenizer.encode("round trip via S3")


def test_token_bytes_are_utf8_lengths_and_zero_for_special_tokens(tokenizer):
    token_bytes = compute_token_bytes(tokenizer)
    assert token_bytes.shape == (VOCAB_SIZE,)
    for token_id in range(VOCAB_SIZE):
        raw = tokenizer.decode_token_bytes(token_id)
        special = raw.decode("utf-8", errors="replace") in SPECIAL_TOKENS
        assert token_bytes[token_id] == (0 if special else len(raw))
    assert (token_bytes == 0).sum() == len(SPECIAL_TOKENS)


def test_get_tokenizer_and_get_token_bytes_read_the_run_directory(rust_tokenizer, base_dir):
    tokenizer_dir = os.path.join(base_dir, "tokenizer")
    expected = save_token_bytes(rust_tokenizer, tokenizer_dir)
    rust_tokenizer.save(tokenizer_dir)
    assert get_tokenizer().encode("hello") == rust_tokenizer.encode("hello")
    assert torch.equal(get_token_bytes("cpu"), expected)


# ----------------------------------------------------------------------------------------------------------
# bad input: one clear error each


@pytest.mark.parametrize("cls", [RustBPETokenizer, HuggingFaceTokenizer])
def test_an_empty_corpus_is_an_error(cls):
    with pytest.raises(VibechatError, match="corpus is empty"):
        cls.train_from_iterator(iter(["", ""]), VOCAB_SIZE)


@pytest.mark.parametrize("cls", [RustBPETokenizer, HuggingFaceTokenizer])
def test_bytes_in_the_corpus_are_an_error_naming_the_text(cls):
    with pytest.raises(VibechatError, match="training text 1 is bytes"):
        cls.train_from_iterator(iter(["fine", b"\xff\xfe not utf-8"]), VOCAB_SIZE)


@pytest.mark.parametrize("cls", [RustBPETokenizer, HuggingFaceTokenizer])
def test_text_that_is_not_valid_utf8_is_an_error_naming_the_text(cls):
    broken = b"caf\xe9 au lait".decode("utf-8", errors="surrogateescape")  # a lone surrogate stands for \xe9
    with pytest.raises(VibechatError, match="training text 2 is not valid UTF-8"):
        cls.train_from_iterator(iter(["fine", "also fine", broken]), VOCAB_SIZE)


@pytest.mark.parametrize("cls", [RustBPETokenizer, HuggingFaceTokenizer])
def test_a_vocab_size_without_room_for_bytes_and_specials_is_an_error(cls, corpus):
    with pytest.raises(VibechatError, match="at least 265"):
        cls.train_from_iterator(corpus, 256 + len(SPECIAL_TOKENS) - 1)


def test_a_corpus_too_small_for_the_vocab_size_is_an_error():
    with pytest.raises(VibechatError, match="only supports a vocabulary"):
        RustBPETokenizer.train_from_iterator(["abab"], VOCAB_SIZE)


@pytest.mark.parametrize("cls", [RustBPETokenizer, HuggingFaceTokenizer])
def test_a_missing_tokenizer_directory_is_an_error_saying_to_train_one(cls, tmp_path):
    with pytest.raises(VibechatError, match="no tokenizer at .*nowhere"):
        cls.from_directory(str(tmp_path / "nowhere"))


def test_a_tokenizer_pickle_with_code_in_it_is_refused(tmp_path):
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(os.getcwd))  # a pickled callable: never loaded
    with pytest.raises(VibechatError, match="not a vibechat tokenizer file"):
        RustBPETokenizer.from_directory(str(tmp_path))


def test_an_unknown_special_token_is_an_error(rust_tokenizer):
    with pytest.raises(VibechatError, match="not a special token"):
        rust_tokenizer.encode("hi", prepend="<|nope|>")


def test_a_pretrained_encoding_that_cannot_be_loaded_is_a_clear_error():
    with pytest.raises(VibechatError, match="could not be loaded"):
        RustBPETokenizer.from_pretrained("no-such-encoding")


# ----------------------------------------------------------------------------------------------------------
# the tokenizer programs


@pytest.fixture
def email_shards(tmp_path, monkeypatch):
    """A store holding a small pydocs corpus (the email package's docstrings), as the data phase leaves it."""
    from vibechat.dataset import build_pydocs
    from vibechat.storage import open_store

    store_url = str(tmp_path / "store")
    build_pydocs(open_store(store_url), root=os.path.join(sysconfig.get_paths()["stdlib"], "email"), shard_chars=20_000)
    monkeypatch.setenv("VIBECHAT_STORE", store_url)
    monkeypatch.setenv("VIBECHAT_DATASET", "pydocs")


def test_tok_train_saves_the_runs_tokenizer_and_reports(email_shards, base_dir):
    from jobs.tok_train import main

    main(["--vocab-size", "400", "--max-chars", "50000", "--doc-cap", "2000"])
    tokenizer = get_tokenizer()
    assert tokenizer.get_vocab_size() == 400
    assert torch.equal(get_token_bytes(), compute_token_bytes(tokenizer))
    report = open(os.path.join(base_dir, "report", "tokenizer-training.md")).read()
    assert "vocab_size: 400" in report
    train_chars = int(re.search(r"train_chars: ([\d,]+)", report).group(1).replace(",", ""))
    assert 0 < train_chars < 50_000 + 2_000  # at most the rest of the document that crossed --max-chars


def test_tok_train_refuses_a_vocab_size_too_small(email_shards, base_dir):
    from jobs.tok_train import main

    with pytest.raises(VibechatError, match="vocab size 100 is too small"):
        main(["--vocab-size", "100"])
    assert not os.path.exists(os.path.join(base_dir, "tokenizer"))


def test_tok_eval_reports_compression_and_says_when_a_reference_is_unavailable(
    email_shards, base_dir, rust_tokenizer, monkeypatch, capsys
):
    import jobs.tok_eval

    rust_tokenizer.save(os.path.join(base_dir, "tokenizer"))
    # a name tiktoken cannot load, as GPT-2's files are on a machine without network
    monkeypatch.setattr(jobs.tok_eval, "REFERENCES", {"gpt2": "not-downloadable"})
    jobs.tok_eval.main(["--max-docs", "5"])
    out = capsys.readouterr().out
    assert "gpt2       unavailable offline" in out
    vibechat_row = next(line.split() for line in out.splitlines() if line.startswith("vibechat"))
    assert vibechat_row[1] == str(VOCAB_SIZE) and 2.0 < float(vibechat_row[4]) < 5.0  # bytes per token
    assert os.path.exists(os.path.join(base_dir, "report", "tokenizer-evaluation.md"))
