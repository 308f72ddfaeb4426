"""The inference engine: KV cache against full forward passes, sampling, stop tokens, calculator tool use, bad input."""

import threading
import time
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn as nn

from vibechat.common import VibechatError

from vibechat.engine import (ContinuousBatcher, Engine, KVCache, Sequence, _decode_and_sample, _DecodeWeights,
                             _forward_step, _fused_step, _StepCache, counter_uniform, gumbel_sample,
                             sample_next_token)
from vibechat.gpt import GPT, GPTConfig
from vibechat.tokenizer import SPECIAL_TOKENS

VOCAB = 64


class CharTokenizer:
    """Stands in for the BPE tokenizer: one id per character, then the special tokens from first_special on."""
    CHARS = "0123456789+-*/.() abcdefghijklmnopqrstuvwxyz"

    def __init__(self, first_special: int):
        self.first_special = first_special

    def encode(self, text: str) -> list[int]:
        return [self.CHARS.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.CHARS[i] for i in ids)

    def encode_special(self, name: str) -> int:
        return self.first_special + SPECIAL_TOKENS.index(name)

    def get_bos_token_id(self) -> int:
        return self.encode_special("<|bos|>")


def random_gpt(seed: int = 0, sequence_len: int = 48) -> GPT:
    """A tiny GPT (with grouped-query attention) whose every weight is random: at init the blocks are the
    identity, which would make the model a bigram table that no cache bug could change."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    model.init_weights()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.weight.size(1) ** -0.5)
    return model.eval()


def gpt_engine(seed: int = 0) -> Engine:
    # special tokens past the vocabulary: a random model never stops or calls the calculator
    return Engine(random_gpt(seed), CharTokenizer(first_special=VOCAB))


class ScriptedModel(nn.Module):
    """Writes script[row][n] as the n-th token after the prompt (past the script's end, its last token),
    whatever it reads, and records the tokens it reads there (a step the engine redoes overwrites its record).
    It keeps one 1-wide head in the cache, so the engine's prefill, cache copy and decode steps run as for a GPT."""

    def __init__(self, script: list[list[int]], vocab_size: int):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=1)
        self.rotary_seq_len = 640
        self.script = script
        self.prompt_len = 0
        self.read = {}  # n -> the last token of the input that produced the n-th token, per row

    def get_device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        pos = int(kv_cache.get_pos())
        if pos == 0:
            self.prompt_len = T
        n = pos + T - self.prompt_len
        kv_cache.insert_kv(0, torch.zeros(B, 1, T, 1), torch.zeros(B, 1, T, 1))
        self.read[n] = idx[:, -1].tolist()
        rows = self.script if B == len(self.script) else self.script[:1] * B  # the prefill runs at batch 1
        chosen = torch.tensor([row[min(n, len(row) - 1)] for row in rows])
        return 10.0 * nn.functional.one_hot(chosen, self.config.vocab_size).float()[:, None, :].expand(B, T, -1)


def scripted_engine(script: list[list[int]]) -> tuple[Engine, ScriptedModel, CharTokenizer]:
    tokenizer = CharTokenizer(first_special=len(CharTokenizer.CHARS))
    model = ScriptedModel(script, vocab_size=len(CharTokenizer.CHARS) + len(SPECIAL_TOKENS))
    return Engine(model, tokenizer), model, tokenizer


def stream(engine: Engine, tokens: list[int], **kwargs) -> tuple[list[list[int]], list[list[int]]]:
    """The streamed columns and their masks."""
    columns, masks = [], []
    for column, column_masks in engine.generate(tokens, **kwargs):
        columns.append(column)
        masks.append(column_masks)
    return columns, masks


# ---------------------------------------------------------------------------------------------------------------
# the KV cache against a full forward pass


@torch.inference_mode()
def test_prefill_then_one_token_decode_steps_give_the_full_forward_logits():
    model = random_gpt()
    ids = torch.randint(0, VOCAB, (2, 20))
    full = model(ids)
    cache = KVCache(2, num_heads=2, seq_len=20, head_dim=8, num_layers=2)
    steps = [model(ids[:, :12], kv_cache=cache)]
    for t in range(12, 20):
        steps.append(model(ids[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_pos() == 20


@torch.inference_mode()
def test_chunked_prefill_gives_the_full_forward_logits():
    model = random_gpt()
    ids = torch.randint(0, VOCAB, (1, 20))
    full = model(ids)
    cache = KVCache(1, num_heads=2, seq_len=32, head_dim=8, num_layers=2)
    chunks = [model(ids[:, a:b], kv_cache=cache) for a, b in [(0, 7), (7, 15), (15, 16), (16, 20)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def prefilled(model: GPT, prompt: torch.Tensor, seq_len: int = 256) -> _StepCache:
    """A decode cache of seq_len slots holding the (B, T) prompt, as a step sees it: at position T."""
    cache = KVCache(prompt.size(0), num_heads=2, seq_len=seq_len, head_dim=8, num_layers=2)
    model(prompt, kv_cache=cache)
    return _StepCache(cache, torch.tensor([prompt.size(1)]))


def forward_step(model: GPT):
    return partial(_forward_step, model)


def fused_step(model: GPT, dtype: torch.dtype = torch.float32):
    return partial(_fused_step, model.config, _DecodeWeights(model, dtype))


@pytest.mark.parametrize("make_step", [forward_step, fused_step], ids=["through forward", "fused"])
@torch.inference_mode()
def test_decode_at_a_device_position_over_the_whole_preallocated_cache_gives_the_full_forward_logits(make_step):
    model = random_gpt()
    forward = make_step(model)
    ids = torch.randint(0, VOCAB, (3, 20))
    ids[:, :12] = ids[0, :12]  # three continuations of one prompt
    full = model(ids)
    prompt = KVCache(1, num_heads=2, seq_len=12, head_dim=8, num_layers=2)
    model(ids[:1, :12], kv_cache=prompt)
    cache = KVCache(3, num_heads=2, seq_len=256, head_dim=8, num_layers=2)
    cache.prefill(prompt)
    step_cache = _StepCache(cache, torch.tensor([12]))
    logits = [forward(ids[:, t:t + 1], step_cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.stack(logits, dim=1), full[:, 12:], atol=1e-5, rtol=1e-5)
    assert step_cache.pos.item() == 20


@torch.inference_mode()
def test_a_step_redone_at_the_same_position_replaces_the_one_before_in_the_cache():
    model = random_gpt()
    forward = fused_step(model)
    ids = torch.randint(0, VOCAB, (1, 12))
    step_cache = prefilled(model, ids[:, :10])
    forward(torch.tensor([[(ids[0, 10].item() + 1) % VOCAB]]), step_cache)  # a token that tool output overrides
    step_cache.pos.sub_(1)
    forward(ids[:, 10:11], step_cache)
    torch.testing.assert_close(forward(ids[:, 11:12], step_cache), model(ids)[:, 11], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_fused_step_in_bfloat16_stays_within_rounding_of_the_full_forward():
    model = random_gpt()
    ids = torch.randint(0, VOCAB, (2, 16))
    full = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = fused_step(model, torch.bfloat16)(ids[:, 15:], prefilled(model, ids[:, :15]))
    torch.testing.assert_close(logits, full[:, 15], atol=0.1, rtol=0)


@torch.inference_mode()
def test_decode_weights_follow_the_model_when_refreshed():
    model = random_gpt()
    weights = _DecodeWeights(model, torch.float32)
    with torch.no_grad():
        model.transformer.h[1].attn.c_k.weight.mul_(2)
    weights.refresh(model)
    qkv = weights.blocks[1][0]
    torch.testing.assert_close(qkv[32:48], model.transformer.h[1].attn.c_k.weight)


@torch.inference_mode()
def test_decode_step_compiles_to_one_graph_that_matches_eager_at_every_batch_and_cache_length():
    model = random_gpt()
    # aot_eager runs Dynamo and the functionalization of the in-place cache writes, as on CUDA, in seconds
    compiled = torch.compile(_fused_step, backend="aot_eager", fullgraph=True)
    weights = _DecodeWeights(model, torch.float32)
    for batch_size, seq_len in [(1, 256), (3, 512), (2, 768)]:  # new shapes recompile, then go dynamic
        ids = torch.randint(0, VOCAB, (batch_size, 16))
        full = model(ids)
        step_cache = prefilled(model, ids[:, :10], seq_len)
        logits = [compiled(model.config, weights, ids[:, t:t + 1].clone(), step_cache) for t in range(10, 16)]
        torch.testing.assert_close(torch.stack(logits, dim=1), full[:, 10:], atol=1e-5, rtol=1e-5)


def test_prefill_copies_a_batch_one_cache_into_every_row():
    source = KVCache(1, num_heads=2, seq_len=5, head_dim=4, num_layers=3)
    for layer in range(3):
        source.insert_kv(layer, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    target = KVCache(4, num_heads=2, seq_len=16, head_dim=4, num_layers=3)
    target.prefill(source)
    assert target.get_pos() == 5
    for layer in range(3):
        assert torch.equal(target.k[layer][:, :, :5], source.k[layer].expand(4, -1, -1, -1))
        assert torch.equal(target.v[layer][:, :, :5], source.v[layer].expand(4, -1, -1, -1))


def test_insert_kv_returns_the_cache_up_to_the_new_tokens_and_moves_after_the_last_layer():
    cache = KVCache(1, num_heads=1, seq_len=8, head_dim=2, num_layers=2)
    keys, _ = cache.insert_kv(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    assert keys.shape == (1, 1, 3, 2) and cache.get_pos() == 0
    cache.insert_kv(1, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    assert cache.get_pos() == 3
    cache.reset()
    assert cache.get_pos() == 0


def test_inserting_past_the_cache_length_is_a_clear_error():
    cache = KVCache(1, num_heads=1, seq_len=4, head_dim=2, num_layers=1)
    cache.insert_kv(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(VibechatError, match="KV cache of 4 positions"):
        cache.insert_kv(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------------------------------------------------------
# sampling


def test_temperature_zero_and_top_k_one_both_pick_the_argmax():
    logits = torch.randn(5, VOCAB)
    rng = torch.Generator().manual_seed(0)
    argmax = logits.argmax(dim=-1, keepdim=True)
    assert torch.equal(sample_next_token(logits, rng, temperature=0.0), argmax)
    assert torch.equal(sample_next_token(logits, rng, temperature=5.0, top_k=1), argmax)


def test_top_k_samples_only_among_the_k_largest_logits():
    logits = torch.randn(1, VOCAB).expand(2000, -1)
    allowed = set(logits[0].topk(3).indices.tolist())
    drawn = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=1.0, top_k=3)
    assert drawn.shape == (2000, 1) and set(drawn.view(-1).tolist()) == allowed


def test_sampled_frequencies_follow_the_softmax_of_the_top_k_at_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]]).expand(40000, -1)
    drawn = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=2.0, top_k=3)
    frequencies = torch.bincount(drawn.view(-1), minlength=5).float() / len(drawn)
    expected = torch.zeros(5)
    expected[[4, 0, 1]] = torch.softmax(torch.tensor([3.0, 2.0, 1.0]) / 2.0, dim=0)
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)


@torch.inference_mode()  # as the Engine runs it
def test_decode_and_sample_compiles_to_the_eager_draws_for_the_same_seeds():
    model = random_gpt()
    forward = fused_step(model)
    compiled = torch.compile(_decode_and_sample, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, VOCAB, (3, 10))
    seeds, temperature = torch.tensor([1, 2, 3]), torch.tensor([0.7])
    drawn = []
    for step in (compiled, _decode_and_sample):
        drawn.append(step(forward, ids[:, 9:].clone(), prefilled(model, ids[:, :9]), seeds, temperature, 5))
    assert torch.equal(drawn[0], drawn[1])


# ---------------------------------------------------------------------------------------------------------------
# generation


def test_greedy_generation_equals_gpt_generate_token_for_token():
    engine = gpt_engine()
    prompt = [3, 14, 15, 9, 2, 6]
    expected = list(engine.model.generate(prompt, max_tokens=30, temperature=0.0))
    columns, masks = stream(engine, prompt, max_tokens=30, temperature=0.0)
    assert [column[0] for column in columns] == expected
    assert all(m == [1] for m in masks)


def test_a_request_decodes_with_the_weights_the_model_has_then():
    engine = gpt_engine()
    prompt = [3, 14, 15, 9, 2, 6]
    stream(engine, prompt, max_tokens=5, temperature=0.0)  # builds the decoder and its copy of the weights
    engine.model.load_state_dict(random_gpt(seed=1).state_dict(), assign=True)  # new tensors, as a reload makes
    expected = list(engine.model.generate(prompt, max_tokens=20, temperature=0.0))
    columns, _ = stream(engine, prompt, max_tokens=20, temperature=0.0)
    assert [column[0] for column in columns] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the prefill is captured as a CUDA graph on a GPU only")
@torch.inference_mode()
def test_a_captured_prefill_gives_the_eager_logits_and_cache_at_every_length_and_follows_a_reload():
    engine = Engine(random_gpt(sequence_len=160).cuda(), CharTokenizer(first_special=VOCAB))

    def check(length: int) -> None:
        tokens = torch.randint(0, VOCAB, (length,)).tolist()
        engine.use_cuda_graph = False
        cache, logits = engine._prefill(tokens)
        expected = logits.clone(), [k[:, :, :length].clone() for k in cache.k + cache.v]
        engine.use_cuda_graph = True
        cache, logits = engine._prefill(tokens)  # padded to a multiple of 64: the same numbers up to rounding
        assert cache.pos == length
        torch.testing.assert_close(logits, expected[0], atol=1e-4, rtol=1e-4)
        for got, want in zip(cache.k + cache.v, expected[1]):
            torch.testing.assert_close(got[:, :, :length], want, atol=1e-4, rtol=1e-4)

    for length in (1, 5, 64, 65, 160, 47, 5):  # padded to 64, 128 and 192
        check(length)
    engine.model.load_state_dict(random_gpt(seed=1, sequence_len=160).cuda().state_dict(), assign=True)
    check(5)  # captured again: the model's tensors are new


def test_greedy_rows_of_a_batch_all_equal_gpt_generate():
    engine = gpt_engine()
    prompt = [7, 1, 8]
    expected = list(engine.model.generate(prompt, max_tokens=20, temperature=0.0))
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=0.0)
    assert results == [prompt + expected] * 3
    assert masks == [[0] * 3 + [1] * 20] * 3


def test_a_request_leaves_nothing_behind_for_the_next_one():
    engine = gpt_engine()
    first = engine.generate_batch([1, 2, 3, 4, 5], num_samples=2, max_tokens=15, temperature=0.0)
    engine.generate_batch([9] * 30, num_samples=2, max_tokens=15, temperature=0.0)  # same buffers, longer prompt
    assert engine.generate_batch([1, 2, 3, 4, 5], num_samples=2, max_tokens=15, temperature=0.0) == first


def test_sampled_rows_differ_and_the_same_seed_repeats_them():
    engine = gpt_engine()
    results, _ = engine.generate_batch([5, 6], num_samples=4, max_tokens=12, temperature=1.0, seed=3)
    assert len({tuple(row) for row in results}) > 1
    again, _ = engine.generate_batch([5, 6], num_samples=4, max_tokens=12, temperature=1.0, seed=3)
    assert again == results
    other, _ = engine.generate_batch([5, 6], num_samples=4, max_tokens=12, temperature=1.0, seed=4)
    assert other != results


def test_max_tokens_bounds_the_number_of_columns():
    engine = gpt_engine()
    assert len(stream(engine, [1, 2, 3], max_tokens=7)[0]) == 7
    assert stream(engine, [1, 2, 3], max_tokens=0)[0] == []


def test_without_max_tokens_generation_fills_the_context():
    engine = gpt_engine()
    columns, _ = stream(engine, list(range(10)), temperature=0.0)
    assert len(columns) == engine.model.config.sequence_len - 10


def test_a_row_stops_at_assistant_end_or_bos_and_the_stream_ends_when_all_rows_have():
    tokenizer = CharTokenizer(first_special=len(CharTokenizer.CHARS))
    a, b = tokenizer.encode("ab")
    end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()
    engine, _, _ = scripted_engine([[a, end, b, b, b, b], [a, b, b, bos, a, a]])
    columns, _ = stream(engine, [bos], num_samples=2, max_tokens=6)
    assert columns == [[a, a], [end, b], [b, b], [b, bos]]
    engine, _, _ = scripted_engine([[a, end, b, b, b, b], [a, b, b, bos, a, a]])
    results, masks = engine.generate_batch([bos], num_samples=2, max_tokens=6)
    assert results == [[bos, a], [bos, a, b, b]]
    assert masks == [[0, 1], [0, 1, 1, 1]]


def test_a_calculator_call_gets_its_result_forced_into_the_row_with_mask_zero():
    tokenizer = CharTokenizer(first_special=len(CharTokenizer.CHARS))
    special = tokenizer.encode_special
    call = [special("<|python_start|>"), *tokenizer.encode("2+3"), special("<|python_end|>")]
    filler = tokenizer.encode("x")
    reply = call + filler * 3 + tokenizer.encode("k") + [special("<|assistant_end|>")]
    engine, model, _ = scripted_engine([reply, reply])
    columns, masks = stream(engine, [tokenizer.get_bos_token_id()], num_samples=2)
    forced = [special("<|output_start|>"), *tokenizer.encode("5"), special("<|output_end|>")]
    expected = call + forced + tokenizer.encode("k") + [special("<|assistant_end|>")]
    assert [column[0] for column in columns] == expected
    assert [m[0] for m in masks] == [1] * len(call) + [0] * 3 + [1, 1]
    assert all(column[0] == column[1] for column in columns) and all(m[0] == m[1] for m in masks)
    # the model reads the forced tokens as its next inputs
    assert [model.read[n][0] for n in range(1, len(expected))] == expected[:-1]


def test_a_call_the_calculator_refuses_forces_nothing():
    tokenizer = CharTokenizer(first_special=len(CharTokenizer.CHARS))
    special = tokenizer.encode_special
    reply = [special("<|python_start|>"), *tokenizer.encode("1/0"), special("<|python_end|>"),
             *tokenizer.encode("ok"), special("<|assistant_end|>")]
    engine, _, _ = scripted_engine([reply])
    columns, masks = stream(engine, [tokenizer.get_bos_token_id()])
    assert [column[0] for column in columns] == reply
    assert all(m == [1] for m in masks)


# ---------------------------------------------------------------------------------------------------------------
# bad input: one clear error, and the engine serves the next request


@pytest.mark.parametrize("tokens, kwargs, message", [
    ([], {}, "prompt is empty"),
    (list(range(10)) * 5, {}, "more than the model's context of 48"),
    ([1, 2, VOCAB], {}, "not an id in the vocabulary"),
    ([1, 2], {"temperature": -0.5}, "temperature -0.5"),
    ([1, 2], {"top_k": 0}, "top_k 0"),
    ([1, 2], {"max_tokens": -1}, "max_tokens -1"),
    ([1, 2], {"num_samples": 0}, "num_samples 0"),
])
def test_bad_requests_get_one_clear_error_and_the_engine_keeps_serving(tokens, kwargs, message):
    engine = gpt_engine()
    with pytest.raises(VibechatError, match=message):
        engine.generate_batch(tokens, **{"max_tokens": 5, **kwargs})
    results, _ = engine.generate_batch([1, 2], max_tokens=5)
    assert len(results[0]) == 7


def test_top_k_above_the_vocabulary_size_keeps_every_token():
    engine = gpt_engine()
    clamped = engine.generate_batch([4, 2], num_samples=3, max_tokens=10, top_k=10 * VOCAB, seed=1)
    assert clamped == engine.generate_batch([4, 2], num_samples=3, max_tokens=10, top_k=None, seed=1)


# --- continuous batching ---

def batcher(max_batch: int = 32) -> ContinuousBatcher:
    return ContinuousBatcher(random_gpt(), CharTokenizer(first_special=VOCAB), max_batch=max_batch)


def submit(batcher: ContinuousBatcher, prompt: list[int], max_tokens: int = 20, **kwargs) -> tuple[list, list]:
    """Queue a sequence; returns the lists its tokens and its finish reason will be appended to."""
    tokens, finish = [], []
    batcher.submit(Sequence(prompt, max_tokens, lambda t, m: tokens.append(t), finish.append, **kwargs))
    return tokens, finish


def drain(batcher: ContinuousBatcher) -> None:
    while batcher.step():
        pass


def prompts(count: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def test_batched_greedy_tokens_equal_the_engines_whether_alone_or_among_31_others():
    b = batcher()
    alone = []
    for prompt in prompts(32):
        tokens, finish = submit(b, prompt)
        drain(b)
        assert finish == ["length"]
        alone.append(tokens)
    together = [submit(b, prompt)[0] for prompt in prompts(32)]
    drain(b)
    assert together == alone
    engine = Engine(b.model, b.engine.tokenizer)
    first = prompts(1)[0]
    assert engine.generate_batch(first, max_tokens=20, temperature=0.0)[0][0][len(first):] == alone[0]


def test_a_sequence_that_joins_a_running_batch_gets_the_tokens_it_gets_alone():
    b = batcher()
    first, second = prompts(2)
    alone = submit(b, second)[0]
    drain(b)
    running = submit(b, first, max_tokens=30)[0]
    for _ in range(5):
        b.step()
    joined = submit(b, second)[0]
    drain(b)
    assert joined == alone and len(running) == 30


def test_a_seeded_sampled_sequence_repeats_alone_or_batched_and_other_seeds_differ():
    b = batcher()
    prompt = prompts(1)[0]
    alone = submit(b, prompt, temperature=1.0, top_k=20, seed=7)[0]
    drain(b)
    batch = [submit(b, prompt, temperature=1.0, top_k=20, seed=seed)[0] for seed in (7, 8, 9)]
    drain(b)
    assert batch[0] == alone and batch[1] != alone and batch[2] != batch[1]
    engine = Engine(b.model, b.engine.tokenizer)  # the same noise, from the same seed and positions
    assert engine.generate_batch(prompt, max_tokens=20, temperature=1.0, top_k=20, seed=7)[0][0][len(prompt):] == alone


def test_a_sequence_ends_at_max_tokens_or_when_the_context_is_full():
    b = batcher()
    short, finish = submit(b, [1, 2, 3], max_tokens=4)
    long, long_finish = submit(b, [1] * 40, max_tokens=100)
    drain(b)
    assert (len(short), finish) == (4, ["length"])
    assert (len(long), long_finish) == (48 - 40, ["length"])


def test_a_cancelled_sequence_frees_its_row_at_the_next_step():
    b = batcher(max_batch=1)
    tokens, finish = [], []
    sequence = Sequence([1, 2], 30, lambda t, m: tokens.append(t), finish.append)
    b.submit(sequence)
    b.step()
    sequence.cancelled = True
    queued, queued_finish = submit(b, [3, 4], max_tokens=3)
    b.step()
    assert finish == ["cancelled"] and b.num_running() == 1 and len(queued) == 1  # in the freed row: prefilled
    drain(b)
    assert queued_finish == ["length"]


def test_a_full_batch_queues_sequences_until_a_row_frees():
    b = batcher(max_batch=2)
    outputs = [submit(b, prompt, max_tokens=5) for prompt in prompts(3)]
    b.step()
    assert (b.num_running(), b.num_waiting()) == (2, 1)
    drain(b)
    assert [finish for _, finish in outputs] == [["length"]] * 3


def test_a_sequence_that_takes_a_row_just_freed_gets_the_tokens_it_gets_alone():
    b = batcher(max_batch=1)
    first, second = prompts(2)
    alone = submit(b, second, max_tokens=5)[0]
    drain(b)
    submit(b, first, max_tokens=3)
    queued, finish = submit(b, second, max_tokens=5)  # admitted while the step after first's last token is in flight
    drain(b)
    assert (queued, finish) == (alone, ["length"])  # that step's column, fed first's token, is not handed to it


def test_a_freed_row_goes_back_to_position_0_while_the_others_decode():
    b = batcher(max_batch=2)
    short, _ = submit(b, [1, 2, 3], max_tokens=2)
    long, _ = submit(b, [4, 5], max_tokens=10)
    drain(b)
    assert (len(short), len(long)) == (2, 10)
    assert b.pos[0].item() == 0  # the steps after it finished read one slot of its row, not its old prefix


def run_until(b: ContinuousBatcher, finished: Callable[[], bool]) -> None:
    """ContinuousBatcher.run on a thread, as the server runs it, until `finished()` (at most 60 s)."""
    stop = threading.Event()
    thread = threading.Thread(target=b.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 60
    while not finished() and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join()
    assert finished(), "the batcher did not get there within 60 s"


def test_a_failing_prefill_ends_every_admitted_sequence_with_error_and_the_next_one_is_served(monkeypatch):
    b = batcher()
    real_forward, failures = b.model.forward, iter([RuntimeError("out of memory (simulated)")])

    def forward(*args, **kwargs):
        if (error := next(failures, None)) is not None:
            raise error
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(b.model, "forward", forward)
    outputs = [submit(b, prompt, max_tokens=5) for prompt in ([1, 2], [3, 4, 5])]  # two lengths: two prefills
    run_until(b, lambda: all(finish for _, finish in outputs))
    assert [finish for _, finish in outputs] == [["error"], ["error"]] and b.num_running() == 0
    tokens, finish = submit(b, [1, 2], max_tokens=5)
    run_until(b, lambda: finish)
    assert (len(tokens), finish) == (5, ["length"])


def test_a_failing_decode_step_ends_the_running_sequences_with_error_and_the_next_one_is_served():
    b = batcher()
    step, failures = b._decode_step(), iter([RuntimeError("out of memory (simulated)")])

    def failing_once() -> torch.Tensor:
        if (error := next(failures, None)) is not None:
            raise error
        return step()

    b._decode = failing_once
    running, running_finish = submit(b, [1, 2], max_tokens=30)
    run_until(b, lambda: running_finish)
    assert running_finish == ["error"] and len(running) == 1  # the prefill's token, then the failed step
    tokens, finish = submit(b, [1, 2], max_tokens=30)
    run_until(b, lambda: finish)
    assert (len(tokens), finish) == (30, ["length"])


@pytest.mark.parametrize("prompt, kwargs, message", [
    ([], {}, "prompt is empty"),
    ([VOCAB + 50], {}, "not an id in the vocabulary"),
    ([1] * 48, {}, "fills the model's context"),
    ([1], {"temperature": -1.0}, "temperature"),
    ([1], {"top_k": 0}, "top_k"),
])
def test_a_bad_sequence_is_refused_at_submit_and_nothing_is_queued(prompt, kwargs, message):
    b = batcher()
    with pytest.raises(VibechatError, match=message):
        submit(b, prompt, **kwargs)
    assert b.num_waiting() == 0


def test_counter_noise_is_uniform_in_the_open_interval_and_a_function_of_seed_and_counter():
    seeds, counters = torch.arange(1000) * 7919, torch.arange(1000) % 13
    noise = counter_uniform(seeds, counters, 100)
    assert 0 < noise.min() and noise.max() < 1
    counts = torch.histc(noise, bins=10, min=0, max=1)
    assert ((counts - 10_000).abs() < 500).all()
    assert torch.equal(counter_uniform(seeds[:3], counters[:3], 100), noise[:3])
    assert not torch.equal(counter_uniform(seeds[:3], counters[:3] + 1, 100), noise[:3])


def test_batched_samples_follow_the_softmax_of_the_top_k_at_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).expand(20_000, -1)
    noise = counter_uniform(torch.arange(20_000), torch.zeros(20_000, dtype=torch.long), 4)
    draws = gumbel_sample(logits, noise, 0.7, 4, torch.full((20_000,), 3))[:, 0]
    expected = torch.softmax(logits[0, :3] / 0.7, dim=0)
    assert torch.allclose(torch.bincount(draws, minlength=5)[:3] / 20_000, expected, atol=0.015)
    assert (draws < 3).all()


def test_a_batched_calculator_call_gets_its_result_forced_in_and_fed_back_as_the_rows_next_inputs():
    tokenizer = CharTokenizer(first_special=VOCAB)
    special = tokenizer.encode_special
    b = ContinuousBatcher(random_gpt(), tokenizer)
    call = [special("<|python_start|>"), *tokenizer.encode("2+3"), special("<|python_end|>")]
    forced = [special("<|output_start|>"), *tokenizer.encode("5"), special("<|output_end|>")]
    stale, after_output, end = tokenizer.encode("x")[0], tokenizer.encode("k")[0], special("<|assistant_end|>")
    script = iter(call)
    inputs = []

    def scripted_step() -> torch.Tensor:  # stands in for the decode step: a "model" that writes the call, then
        inputs.append(token := int(b.tokens[0, 0]))  # answers the tool's output with "k" and "k" with the end;
        next_token = {forced[-1]: after_output, after_output: end}.get(token)  # anything else: "x"
        b.tokens[0, 0] = next(script, stale) if next_token is None else next_token
        return b.tokens

    b._decode = scripted_step
    emitted, finish = [], []
    b.submit(Sequence([1, 2], 40, lambda t, m: emitted.append((t, m)), finish.append))
    drain(b)
    # no token sampled from a stale input ("x") is handed out: the host runs a step behind, drops those columns
    assert [t for t, _ in emitted[1:]] == call + forced + [after_output, end] and finish == ["stop"]
    assert [m for _, m in emitted[1:]] == [1] * len(call) + [0] * len(forced) + [1, 1]
    assert [t for t in inputs if t in forced] == forced  # each forced token was fed back as the row's input
