"""Inference: a preallocated KV cache, and an Engine that streams samples with calculator tool use.

The prompt is prefilled once at batch 1 (through GPT.forward; on CUDA captured as a graph per prompt length
rounded up to PREFILL_BUCKET) and its cache copied into every sample's row.
Decoding then runs one token per step over a cache preallocated to the longest sequence, at a position held
on the device, so every step has the same shapes: on CUDA the step is compiled and captured as a CUDA graph
once per (batch size, cache length, top_k) and replayed for each token; elsewhere it runs eagerly. For a GPT
the step is a fused rewrite of its forward for one token (`_fused_step`: stacked QKV weights in the decode
dtype, Triton kernels from vibechat.decode_ops on CUDA). The step samples too (Gumbel-max over the top_k
logits, with uniform noise a hash of (the sample's seed, the position), computed in the step), so a token costs
two launches: the graph and the copy of its column to the host. The host runs one column behind: it
reads and yields column t (the one host sync per step) while the GPU computes column t+1; when tool output
overrides column t, the cache position steps back one and column t+1 is computed again.

ContinuousBatcher serves many sequences at once (jobs.chat_server): each joins the running decode batch at a step
boundary and leaves when done, with its own position, sampling settings and seed, through the same fused step.
"""

import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from vibechat.calculator import use_calculator
from vibechat.common import VibechatError
from vibechat.decode_ops import attend, attention_output, linear, topk
from vibechat.gpt import GPT, SOFTCAP, norm

CACHE_BUCKET = 256  # decode caches are sized in multiples of this, so one captured graph serves many requests
PREFILL_BUCKET = 64  # captured prefills take prompts padded to a multiple of this: one graph per 64 lengths


class KVCache:
    """Keys and values of every layer, preallocated to seq_len positions; all rows share one position."""

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int):
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.seq_len = seq_len
        self.head_dim = head_dim
        self.num_layers = num_layers
        # one (B, H, seq_len, D) tensor per layer, allocated at the first insert in the model's dtype and device;
        # separate tensors, so a compiled step updates each in place instead of copying a stacked buffer
        self.k: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        self.pos = 0

    def _allocate(self, dtype: torch.dtype, device: torch.device) -> None:
        shape = (self.batch_size, self.num_heads, self.seq_len, self.head_dim)
        # zeros, not empty: masked slots still meet a zero attention weight, and 0 * NaN garbage would be NaN
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]

    def reset(self) -> None:
        self.pos = 0

    def get_pos(self) -> int:
        return self.pos

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, T, D) keys and values at the current position; the layer's cache up to the new tokens."""
        if self.k is None:
            self._allocate(k.dtype, k.device)
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.seq_len:
            raise VibechatError(f"KV cache of {self.seq_len} positions cannot take {k.size(2)} more tokens at "
                                f"position {t0}: create the cache with a longer seq_len")
        self.k[layer_idx][:, :, t0:t1] = k
        self.v[layer_idx][:, :, t0:t1] = v
        if layer_idx == self.num_layers - 1:
            self.pos = t1
        return self.k[layer_idx][:, :, :t1], self.v[layer_idx][:, :, :t1]

    def prefill(self, other: "KVCache") -> None:
        """Copy a batch-1 cache into every row, so one prefill of a prompt serves all samples."""
        if other.batch_size != 1:
            raise VibechatError(f"prefill copies from a batch-1 cache, not one of batch {other.batch_size}")
        if (other.num_heads, other.head_dim, other.num_layers) != (self.num_heads, self.head_dim, self.num_layers):
            raise VibechatError("prefill needs caches of the same model: heads, head size and layers differ")
        if other.pos > self.seq_len:
            raise VibechatError(f"cannot prefill {other.pos} positions into a KV cache of {self.seq_len}")
        self.pos = other.pos
        if other.k is None:
            return
        if self.k is None:
            self._allocate(other.k[0].dtype, other.k[0].device)
        for dst, src in zip(self.k + self.v, other.k + other.v):
            dst[:, :, :other.pos] = src[:, :, :other.pos]  # broadcasts over the rows


class _StepCache:
    """A KVCache as the decode step sees it: one token per row written at a position held on the device ((1,)
    shared by all rows, or (B,) one per row), and the whole buffers read back, the attention mask hiding what
    lies past each position. With no host int in the step, one capture of it replays at every position."""

    def __init__(self, cache: KVCache, pos: torch.Tensor):
        self.cache = cache
        self.pos = pos

    def get_pos(self) -> torch.Tensor:
        return self.pos

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.k[layer_idx], self.cache.v[layer_idx]
        if self.pos.numel() == 1:
            keys[:, :, self.pos] = k
            values[:, :, self.pos] = v
        else:
            rows = torch.arange(self.cache.batch_size, device=k.device)
            keys[rows, :, self.pos] = k[:, :, 0]
            values[rows, :, self.pos] = v[:, :, 0]
        return keys, values


def _forward_step(model, tokens: torch.Tensor, cache: _StepCache) -> torch.Tensor:
    """A decode step through model.forward: for any model with GPT's forward(idx, kv_cache=)."""
    logits = model(tokens, kv_cache=cache)[:, -1, :]
    cache.pos.add_(1)
    return logits


class _DecodeWeights:
    """A GPT's weights as the fused decode step reads them: in the decode dtype (cast once per request, not
    at every step as autocast would), each block's query, key and value matrices stacked into one, so they
    cost one matrix-vector product, not three. refresh() copies them from the model; every generate calls
    it, so training between requests (RL) is seen and the captured step keeps reading the same buffers."""

    def __init__(self, model, dtype: torch.dtype):
        self.buffers = [torch.empty(sum(w.size(0) for w in group), group[0].size(1), device=group[0].device,
                                    dtype=group[0].dtype if keeps_dtype else dtype)
                        for group, keeps_dtype in self._groups(model)]
        self.refresh(model)
        self.wte, self.lm_head, self.cos, self.sin = self.buffers[:4]
        self.blocks = [self.buffers[i:i + 4] for i in range(4, len(self.buffers), 4)]  # (qkv, o, fc, proj)

    @staticmethod
    def _groups(model) -> list[tuple[list[torch.Tensor], bool]]:
        """(the tensors stacked into one buffer, whether it keeps their dtype): the rotary tables do, as the
        model's forward reads them in theirs."""
        groups = [([model.transformer.wte.weight], False), ([model.lm_head.weight], False),
                  ([model.cos[0, 0]], True), ([model.sin[0, 0]], True)]
        for block in model.transformer.h:
            attn, mlp = block.attn, block.mlp
            groups += [([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight], False), ([attn.c_proj.weight], False),
                       ([mlp.c_fc.weight], False), ([mlp.c_proj.weight], False)]
        return groups

    @torch.no_grad()
    def refresh(self, model) -> None:
        for buffer, (group, _) in zip(self.buffers, self._groups(model)):
            torch.cat(group, out=buffer)


def _fused_step(config, weights: _DecodeWeights, tokens: torch.Tensor, cache: _StepCache) -> torch.Tensor:
    """GPT.forward for one token per row, from the KV cache: the same arithmetic (the tests hold it to the full
    forward's logits), with the norms, ReLU², residual adds and the logits' soft cap folded into the
    matrix-vector products, and the rotary embedding, QK-norm and cache write into attention, which reads only
    the written part of the cache (vibechat.decode_ops): at batch 1, five launches a layer."""
    x = norm(weights.wte[tokens[:, 0]])  # (B, C)
    for layer, (qkv, o, fc, proj) in enumerate(weights.blocks):
        parts = attend(linear(x, qkv, norm_input=True), weights.cos, weights.sin, cache.cache.k[layer],
                       cache.cache.v[layer], cache.pos, config.n_head)
        x = attention_output(parts, o, residual=x)
        x = linear(linear(x, fc, norm_input=True, relu2=True), proj, residual=x)
    logits = linear(x, weights.lm_head, norm_input=True, softcap=SOFTCAP)
    cache.pos.add_(1)
    return logits


def _mix_seed(seed: int) -> int:
    """Any int -> 32 bits, every bit of the seed mattering (Fibonacci hashing)."""
    return (seed * 0x9E3779B97F4A7C15 >> 32) & 0xFFFFFFFF


def counter_uniform(seeds: torch.Tensor, counters: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) 32-bit seeds and (B,) counters -> (B, k) uniform noise in (0, 1), a hash of (seed, counter, column):
    no generator state, so a row's noise depends on its own seed and position alone, never on which other rows
    share the step, and it is computed inside the captured step. Products wrap in int64 and are masked back to
    32 bits; the finalizer is the 'lowbias32' integer hash. The column's multiplier stays below 2**31: inductor
    multiplies its loop index (int32) by it."""
    mask = 0xFFFFFFFF
    columns = torch.arange(k, device=seeds.device)
    x = (seeds[:, None] * 0x9E3779B1 + counters[:, None] * 0x85EBCA77 + columns * 0x27D4EB2F) & mask
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    x = x ^ (x >> 16)
    return ((x >> 9) + 1).float() / (2 ** 23 + 1)  # 23 bits: float32 keeps the largest value below 1


def _decode_and_sample(forward, tokens: torch.Tensor, cache: _StepCache, seeds: torch.Tensor,
                       temperature: torch.Tensor, top_k: int) -> torch.Tensor:
    """Feed `tokens` at the cache's position through forward(tokens, cache) and sample the next ones into
    `tokens` (returned too), with noise from (each row's seed, the position): no launch outside the step."""
    noise = counter_uniform(seeds, cache.pos.expand_as(seeds), top_k)
    tokens.copy_(gumbel_sample(forward(tokens, cache), noise, temperature, top_k))
    return tokens


def _cuda_graph(fn, pool=None):
    """Record fn's kernels once (in `pool`, a graph memory pool, if given); the returned function replays them
    and returns fn's output tensor, rewritten."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile, autotune and allocate before capturing
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


class _Prefill:
    """Batch-1 prefills captured as CUDA graphs, one per prompt length rounded up to PREFILL_BUCKET: GPT.forward
    over a chat-sized prompt is hundreds of launches that take longer than its compute (d20, 128 tokens on an
    H200: 15 ms eager, 2 ms replayed). A prompt is padded on the right, which causal attention keeps out of its
    logits and keys. All graphs write one KV cache of the longest prompt, read only up to the prompt's length,
    and share one memory pool: a prefill's outputs are read before the next one runs."""

    def __init__(self, model):
        config = model.config
        self.model = model
        self.longest = min(-(-config.sequence_len // PREFILL_BUCKET) * PREFILL_BUCKET, model.rotary_seq_len)
        self.ids = torch.zeros(1, self.longest, dtype=torch.long, device=model.get_device())
        self.last = torch.zeros(1, dtype=torch.long, device=model.get_device())  # the prompt's last position
        self.cache = KVCache(1, config.n_kv_head, self.longest, config.n_embd // config.n_head, config.n_layer)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}

    def __call__(self, tokens: list[int]) -> tuple[KVCache, torch.Tensor]:
        length = min(-(-len(tokens) // PREFILL_BUCKET) * PREFILL_BUCKET, self.longest)
        if length not in self.graphs:
            ids = self.ids[:, :length]

            def forward() -> torch.Tensor:
                self.cache.reset()
                return self.model(ids, kv_cache=self.cache).index_select(1, self.last)[:, 0]

            self.graphs[length] = _cuda_graph(forward, self.pool)
        self.ids[0, :len(tokens)] = torch.tensor(tokens)
        self.last.fill_(len(tokens) - 1)
        logits = self.graphs[length]()
        self.cache.pos = len(tokens)
        return self.cache, logits


class _Decoder:
    """The decode step at one batch size, cache length and top_k: advance() feeds `tokens` at `pos`, samples
    the next column into `tokens` at `temperature` and moves `pos` on. Its buffers live as long as the Engine,
    at fixed addresses, as a captured graph needs."""

    def __init__(self, model, batch_size: int, seq_len: int, top_k: int, dtype: torch.dtype, device: torch.device,
                 cuda_graph: bool):
        config = model.config
        self.model = model
        self.cache = KVCache(batch_size, config.n_kv_head, seq_len, config.n_embd // config.n_head, config.n_layer)
        self.cache._allocate(dtype, device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.seeds = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.temperature = torch.ones(1, device=device)
        self.top_k = top_k
        # the token column's way to the host: pinned memory and an event, so that reading it waits for the copy
        # alone and not for a step launched after it
        self.host_tokens = torch.empty(batch_size, dtype=torch.long, pin_memory=device.type == "cuda")
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        if isinstance(model, GPT):
            self.weights = _DecodeWeights(model, dtype)
            forward = partial(_fused_step, config, self.weights)
        else:
            self.weights = None
            forward = partial(_forward_step, model)
        args = (forward, self.tokens, _StepCache(self.cache, self.pos), self.seeds, self.temperature, top_k)
        if cuda_graph:
            compiled = torch.compile(_decode_and_sample, dynamic=False)  # one static graph per shape and top_k
            self.step = _cuda_graph(lambda: compiled(*args))
        else:
            self.step = lambda: _decode_and_sample(*args)

    def start(self, prefill: KVCache, first: torch.Tensor, temperature: float, seeds: torch.Tensor) -> None:
        if self.weights is not None:
            self.weights.refresh(self.model)
        self.cache.prefill(prefill)
        self.pos.fill_(prefill.pos)
        self.tokens.copy_(first)
        self.temperature.fill_(temperature)
        self.seeds.copy_(seeds)

    def advance(self) -> None:
        """Sample the next column into `tokens`: one graph replay on CUDA."""
        self.step()

    def send_column(self) -> None:
        """Start copying the current column to the host: queued before the next advance, it reads this one."""
        self.host_tokens.copy_(self.tokens.view(-1), non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def receive_column(self) -> list[int]:
        """The column sent last; the host's one wait per step."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_tokens.tolist()


@dataclass
class _Row:
    """One sample's state: done at a stop token; a calculator expression being written; tool output to force."""
    done: bool = False
    expression: list[int] | None = None  # tokens since <|python_start|>; None outside a call
    forced: deque = field(default_factory=deque)


def _check_sampling(temperature: float, top_k: int | None) -> None:
    if not temperature >= 0:  # also refuses NaN
        raise VibechatError(f"temperature {temperature} is not allowed: use 0 for greedy decoding or a positive "
                            "value to sample")
    if top_k is not None and top_k < 1:
        raise VibechatError(f"top_k {top_k} is not allowed: use a positive number, or None to sample from all tokens")


def gumbel_sample(logits: torch.Tensor, noise: torch.Tensor, temperature: torch.Tensor | float,
                  top_k: int, row_top_k: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids drawn from the softmax of the top_k logits at `temperature`, given (B, top_k)
    uniform noise: argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T). No host sync, no
    data-dependent shape, so it runs inside a captured decode step. top_k 1 is greedy (noise is then unused).
    row_top_k ((B,) long, each <= top_k) narrows each row to its own k largest; temperature may be (B, 1)."""
    if top_k == 1 and row_top_k is None:  # every row greedy
        return logits.argmax(dim=-1, keepdim=True)
    if top_k < logits.size(-1) or row_top_k is not None:
        values, indices = topk(logits, top_k)
    else:
        values, indices = logits, None
    scores = values.float() / temperature - torch.log(-torch.log(noise))
    if row_top_k is not None:
        scores = scores.masked_fill(torch.arange(top_k, device=scores.device) >= row_top_k[:, None], float("-inf"))
    choice = scores.argmax(dim=-1, keepdim=True)
    return choice if indices is None else indices.gather(-1, choice)


def _sampling(temperature: float, top_k: int | None, vocab_size: int) -> tuple[float, int]:
    """(temperature, k) for gumbel_sample: greedy as top-1 at temperature 1, no top_k as the whole vocabulary."""
    if temperature == 0:
        return 1.0, 1
    return temperature, vocab_size if top_k is None else min(top_k, vocab_size)


def sample_next_token(logits: torch.Tensor, rng: torch.Generator, temperature: float = 1.0,
                      top_k: int | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids: argmax at temperature 0, else a draw from the softmax of the top_k logits
    at that temperature. top_k None, or above the vocabulary size, keeps every token."""
    _check_sampling(temperature, top_k)
    temperature, k = _sampling(temperature, top_k, logits.size(-1))
    noise = torch.rand(logits.size(0), k, generator=rng, device=logits.device)
    return gumbel_sample(logits, noise, temperature, k)


class Engine:
    """Streams samples from a model, one generation at a time: the decode buffers are reused across calls.

    A GPT decodes from a copy of its weights taken at the start of every request, so whatever happened to
    the model in between (an optimizer step, a new state dict) is seen. Any other model with GPT's
    forward(idx, kv_cache=) decodes through that forward, and a captured step then reads its weights where
    they lie: updates in place are seen, replaced tensors need a new Engine.
    """

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        # the compiled, graph-captured decode step needs CUDA; set False to decode eagerly there too
        self.use_cuda_graph = model.get_device().type == "cuda"
        self._decoders: dict[tuple, _Decoder] = {}
        self._prefills: dict[torch.dtype | bool, _Prefill] = {}  # by autocast dtype (False: off)
        self._prefill_weights: list[tuple] = []  # where (and as what) the captured prefills read the model's tensors
        special = tokenizer.encode_special
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def _check_request(self, tokens: list[int], num_samples: int, max_tokens: int | None, temperature: float,
                       top_k: int | None) -> None:
        vocab_size, context = self.model.config.vocab_size, self.model.config.sequence_len
        if len(tokens) == 0:
            raise VibechatError("the prompt is empty: give at least one token (a conversation starts with <|bos|>)")
        if len(tokens) > context:
            raise VibechatError(f"the prompt has {len(tokens)} tokens, more than the model's context of {context}: "
                                "shorten it or start a new conversation")
        bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise VibechatError(f"prompt token {bad!r} is not an id in the vocabulary [0, {vocab_size}): encode the "
                                "prompt with the model's tokenizer")
        if num_samples < 1:
            raise VibechatError(f"num_samples {num_samples} is not allowed: ask for at least 1 sample")
        if max_tokens is not None and max_tokens < 0:
            raise VibechatError(f"max_tokens {max_tokens} is negative: use 0 or more, or None to fill the context")
        _check_sampling(temperature, top_k)

    def _prefill(self, tokens: list[int]) -> tuple[KVCache, torch.Tensor]:
        """The prompt's batch-1 KV cache and its last position's logits (1, V): on CUDA through the captured
        prefills (captured again if the model's tensors moved, e.g. after model.to()), elsewhere through
        GPT.forward."""
        model, config = self.model, self.model.config
        if not self.use_cuda_graph:
            cache = KVCache(1, config.n_kv_head, len(tokens), config.n_embd // config.n_head, config.n_layer)
            ids = torch.tensor([tokens], dtype=torch.long, device=model.get_device())
            return cache, model(ids, kv_cache=cache)[:, -1, :]
        weights = [(t.data_ptr(), t.dtype) for t in (*model.parameters(), *model.buffers())]
        if weights != self._prefill_weights:
            self._prefills.clear()
            self._prefill_weights = weights
        autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda")
        if autocast not in self._prefills:
            self._prefills[autocast] = _Prefill(model)
        return self._prefills[autocast](tokens)

    def _decoder(self, batch_size: int, seq_len: int, top_k: int, prefill: KVCache) -> _Decoder:
        like = prefill.k[0]
        key = (batch_size, seq_len, top_k, like.dtype, self.use_cuda_graph)
        if key not in self._decoders:
            self._decoders[key] = _Decoder(self.model, batch_size, seq_len, top_k, like.dtype, like.device,
                                           self.use_cuda_graph)
        return self._decoders[key]

    def _advance(self, row: _Row, token: int) -> None:
        """Update a row's state with its new token; a finished calculator call queues the result to force."""
        if token in self.stop_tokens:
            row.done = True
        elif token == self.python_start:
            row.expression = []
        elif token == self.python_end and row.expression is not None:
            result = use_calculator(self.tokenizer.decode(row.expression))
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            row.expression = None
        elif row.expression is not None:
            row.expression.append(token)

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42):
        """Yield (token_column, token_masks) per step, one entry per sample; mask 1 = sampled, 0 = forced tool output.

        A sample is done at <|assistant_end|> or <|bos|> (yielded); done samples go on sampling until all are
        done, max_tokens columns were yielded, or the sequence fills the context: sequence_len when max_tokens
        is None, else the model's rotary table. A top_k above the vocabulary size keeps every token. A bad
        request (an empty or over-long prompt, ids outside the vocabulary, a negative temperature or max_tokens,
        top_k or num_samples below 1) raises VibechatError before any work.
        """
        self._check_request(tokens, num_samples, max_tokens, temperature, top_k)
        model, device = self.model, self.model.get_device()
        limit = model.config.sequence_len if max_tokens is None else len(tokens) + max_tokens
        max_len = min(limit, model.rotary_seq_len)
        if max_len <= len(tokens):
            return
        config = model.config
        prefill, logits = self._prefill(tokens)
        logits = logits.expand(num_samples, -1)
        temperature, k = _sampling(temperature, top_k, config.vocab_size)
        # the last step's input is at position max_len - 2
        decoder = self._decoder(num_samples, -(-(max_len - 1) // CACHE_BUCKET) * CACHE_BUCKET, k, prefill)
        # after building: capturing ran warm-up steps on the buffers
        # sample i's seed: the request's with i in its high bits, so that sample 0 draws what the
        # ContinuousBatcher draws for the same seed
        seeds = torch.tensor([_mix_seed(seed + (i << 32)) for i in range(num_samples)], device=device)
        noise = counter_uniform(seeds, torch.full_like(seeds, len(tokens) - 1), k)  # as a step at the last position
        decoder.start(prefill, gumbel_sample(logits, noise, temperature, k), temperature, seeds)

        rows = [_Row() for _ in range(num_samples)]
        num_columns = max_len - len(tokens)
        for step in range(num_columns):
            decoder.send_column()
            last = step == num_columns - 1
            if not last:
                decoder.advance()  # the GPU computes the next column while the host handles this one
            column = decoder.receive_column()
            masks = [1] * num_samples
            for i, row in enumerate(rows):
                if row.forced:
                    column[i], masks[i] = row.forced.popleft(), 0
                if not row.done:
                    self._advance(row, column[i])
            yield column, masks
            if all(row.done for row in rows):
                return
            if not all(masks) and not last:
                # the next column came from the sampled tokens: step back and redo it from the tool output
                decoder.pos.sub_(1)
                decoder.tokens.copy_(torch.tensor(column, device=device).view(-1, 1))
                decoder.advance()

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """(results, masks) per sample: the prompt, then the sample's tokens up to but not including its stop
        token; masks are 0 on the prompt and on forced tool output."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in self.stop_tokens:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks


PREFILL_TOKENS = 16_384  # the most prompt tokens (padding included) that one prefill pass of the batcher takes


@dataclass
class Sequence:
    """One request to the ContinuousBatcher. on_token(token, mask) gets every token as it is decided (mask 0:
    forced calculator output), the stop token included; then on_finish(reason) once: "stop" (a stop token),
    "length" (max_tokens, or the context is full), "cancelled" or "error" (a step failed: ContinuousBatcher.run). Both
    run on the batcher's thread."""
    tokens: list[int]
    max_tokens: int
    on_token: Callable[[int, int], None]
    on_finish: Callable[[str], None]
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 42
    cancelled: bool = False  # set from any thread: the row is freed at the next step boundary


@dataclass
class _Slot:
    sequence: Sequence
    row: _Row
    first_step: int  # the first decode step whose column is this sequence's: steps launched earlier fed another input
    generated: int = 0


def _batched_decode_and_sample(forward, tokens: torch.Tensor, cache: _StepCache, seeds: torch.Tensor,
                               temperature: torch.Tensor, top_k: int, row_top_k: torch.Tensor, busy: torch.Tensor,
                               last_position: int) -> torch.Tensor:
    """The continuous batcher's step: every row's token at its own position, the next one sampled into `tokens`
    with noise from (its seed, its position). Positions stop at the cache's last slot, so a row never writes
    past its end, and a free row goes back to position 0, so its attention reads one slot, not a stale prefix."""
    noise = counter_uniform(seeds, cache.pos, top_k)
    tokens.copy_(gumbel_sample(forward(tokens, cache), noise, temperature, top_k, row_top_k))
    cache.pos.copy_(torch.where(busy, cache.pos.clamp(max=last_position), 0))
    return tokens


class ContinuousBatcher:
    """Continuous batching of a GPT: sequences join the running decode batch at a step boundary and leave when
    done, each with its own position, temperature, top_k and seed.

    Every sequence owns a row of one KV cache of max_batch rows and the model's full context. A step first
    admits waiting sequences into free rows (those with prompts of one length prefill together through
    GPT.forward, their caches copied into the rows: up to PREFILL_TOKENS a pass), then decodes one token for
    every row, busy or free, through the fused decode step with a position per row: one shape whatever the
    number of busy rows, so a sequence gets the same tokens, bit for bit, alone or among others (prefills run
    at a row count fixed by the prompt length for the same reason), and on CUDA one compiled step captured once
    as a CUDA graph. Decoding reads every weight once whatever the rows, so free rows cost little (d20 on an
    H200, before the batch-1 rewrite of the step: 1.10 ms for 64 rows, 0.75 for one; docs/benchmarks.md). The
    rows' tokens, positions, seeds, temperatures and top_k live on the device and the step advances them itself.

    The host runs one step behind the GPU: it launches step s+1, then reads and hands out the column of step s
    while the GPU computes. Where the host overrides a row's token of step s (calculator output), step s+1 fed
    the stale one: its column for that row is dropped and the row's position steps back, so that step s+2 feeds
    the forced token at the right place; sampling noise is a hash of (seed, position), so the redone step draws
    what the dropped one would have. A row freed meanwhile has its column s+1 dropped too (a sequence admitted
    into it reads from the first step launched after its prefill).
    """

    def __init__(self, model: GPT, tokenizer, max_batch: int = 32, max_top_k: int = 200):
        if not isinstance(model, GPT):
            raise VibechatError("continuous batching decodes a GPT through its fused step, not a "
                                f"{type(model).__name__}")
        self.engine = Engine(model, tokenizer)  # its request checks, stop tokens and calculator
        self.model, config = model, model.config
        self.device = device = model.get_device()
        self.max_batch = max_batch
        self.top_k = min(max_top_k, config.vocab_size)
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(max_batch, config.n_kv_head, config.sequence_len, config.n_embd // config.n_head,
                             config.n_layer)
        self.cache._allocate(dtype, device)
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.seeds = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.temperature = torch.ones(max_batch, 1, device=device)
        self.row_top_k = torch.ones(max_batch, dtype=torch.long, device=device)
        # the rows holding a sequence, as the step reads them: a free row steps too but goes back to position 0
        self.busy = torch.zeros(max_batch, dtype=torch.bool, device=device)
        self.weights = _DecodeWeights(model, dtype)
        self._decode: Callable[[], torch.Tensor] | None = None
        # two pinned host columns, so that step s+1's copy never lands in the one the host is reading
        pinned = device.type == "cuda"
        self.columns = [torch.empty(max_batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.copied = [torch.cuda.Event() if pinned else None for _ in range(2)]
        self.launched = 0  # decode steps launched so far
        self.in_flight: int | None = None  # the step launched and not yet handed out
        self.slots: list[_Slot | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()

    def _prefill_rows(self, length: int) -> int:
        """Rows of every prefill of prompts of this length: fixed by the length alone (a sequence prefilled
        alone or with others then sees one matrix-product shape), at most PREFILL_TOKENS."""
        return max(1, min(self.max_batch, PREFILL_TOKENS // length))

    def _decode_step(self) -> Callable[[], torch.Tensor]:
        """The decode step of all rows: compiled and captured on CUDA at its first use."""
        if self._decode is None:
            forward = partial(_fused_step, self.model.config, self.weights)
            args = (forward, self.tokens, _StepCache(self.cache, self.pos), self.seeds, self.temperature, self.top_k,
                    self.row_top_k, self.busy, self.cache.seq_len - 1)
            if self.engine.use_cuda_graph:
                # compiling and capturing run the step a few times: the rows' tokens and positions are put back
                saved = self.tokens.clone(), self.pos.clone()
                compiled = torch.compile(_batched_decode_and_sample, dynamic=False)
                self._decode = _cuda_graph(lambda: compiled(*args))
                self.tokens.copy_(saved[0])
                self.pos.copy_(saved[1])
            else:
                self._decode = lambda: _batched_decode_and_sample(*args)
        return self._decode

    def warmup(self) -> None:
        """Compile and capture the decode step now, not on the first request."""
        self._decode_step()

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence (from any thread); a bad one raises VibechatError here, before it is queued."""
        self.engine._check_request(sequence.tokens, 1, sequence.max_tokens, sequence.temperature, sequence.top_k)
        if len(sequence.tokens) >= self.model.config.sequence_len:
            raise VibechatError(f"the prompt has {len(sequence.tokens)} tokens and fills the model's context of "
                                f"{self.model.config.sequence_len}: shorten it")
        with self.lock:
            self.waiting.append(sequence)
        self.wake.set()

    def num_running(self) -> int:
        return sum(slot is not None for slot in self.slots)

    def num_waiting(self) -> int:
        return len(self.waiting)

    def _finish(self, index: int, reason: str) -> None:
        slot = self.slots[index]
        self.slots[index] = None
        self.busy[index] = False
        slot.sequence.on_finish(reason)

    def _emit(self, index: int, token: int, mask: int) -> None:
        """Hand a row its token; free the row when that ends the sequence."""
        slot = self.slots[index]
        slot.generated += 1
        slot.sequence.on_token(token, mask)
        self.engine._advance(slot.row, token)
        room = self.model.config.sequence_len - len(slot.sequence.tokens)  # positions left for new tokens
        if slot.row.done:
            self._finish(index, "stop")
        elif slot.generated >= min(slot.sequence.max_tokens, room):
            self._finish(index, "length")

    def _prefill(self, indices: list[int]) -> None:
        """Prefill the sequences admitted into rows `indices`, all of one prompt length, in one forward pass; emit
        their first tokens."""
        sequences = [self.slots[index].sequence for index in indices]
        config, n = self.model.config, len(sequences[0].tokens)
        width = self._prefill_rows(n)
        prefill = KVCache(width, config.n_kv_head, n, config.n_embd // config.n_head, config.n_layer)
        ids = torch.zeros(width, n, dtype=torch.long, device=self.device)  # rows past the sequences: padding
        ids[:len(sequences)] = torch.tensor([sequence.tokens for sequence in sequences], device=self.device)
        logits = self.model(ids, kv_cache=prefill)[:len(sequences), -1, :]
        rows = torch.tensor(indices, device=self.device)
        for dst, src in zip(self.cache.k + self.cache.v, prefill.k + prefill.v):
            dst[rows, :, :n] = src[:len(sequences)]
        sampling = [_sampling(s.temperature, s.top_k, config.vocab_size) for s in sequences]
        self.temperature[rows] = torch.tensor([[t] for t, _ in sampling], device=self.device)
        self.row_top_k[rows] = torch.tensor([min(k, self.top_k) for _, k in sampling], device=self.device)
        self.seeds[rows] = torch.tensor([_mix_seed(s.seed) for s in sequences], device=self.device)
        self.pos[rows] = n - 1  # the last prompt token's position: the first token's noise counter, as in a step
        noise = counter_uniform(self.seeds[rows], self.pos[rows], self.top_k)
        first = gumbel_sample(logits, noise, self.temperature[rows], self.top_k, self.row_top_k[rows])
        self.tokens[rows] = first
        self.pos[rows] = n
        self.busy[rows] = True
        for index, token in zip(indices, first.view(-1).tolist()):
            self._emit(index, token, 1)

    def _launch(self) -> int:
        """Start the next decode step and the copy of its column to the host, without waiting for either; the
        step's number."""
        self._decode_step()()
        column, copied = self.columns[self.launched % 2], self.copied[self.launched % 2]
        column.copy_(self.tokens.view(-1), non_blocking=True)
        if copied is not None:
            copied.record()
        self.launched += 1
        return self.launched - 1

    def _hand_out(self, step: int) -> None:
        """Give each row its token of decode step `step` (its column read here: the host's one wait per step)."""
        if self.copied[step % 2] is not None:
            self.copied[step % 2].synchronize()
        column = self.columns[step % 2].tolist()
        for i, slot in enumerate(self.slots):
            if slot is None or step < slot.first_step:
                continue  # a free row, or a sequence that joined after this step was launched
            if slot.row.forced:
                # the calculator's output replaces the sampled token; the step in flight fed the sampled one, so
                # its column for this row is dropped and the row steps back to feed the forced token instead
                token, mask = slot.row.forced.popleft(), 0
                self.tokens[i] = token
                self.pos[i] -= 1
                slot.first_step = step + 2
            else:
                token, mask = column[i], 1
            self._emit(i, token, mask)

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit what waits (as rows free up), launch the next decode step and hand out the previous one's tokens;
        False when idle."""
        for index, slot in enumerate(self.slots):
            if slot is not None and slot.sequence.cancelled:
                self._finish(index, "cancelled")
        free = [i for i, slot in enumerate(self.slots) if slot is None]
        joining: dict[int, list[int]] = {}  # prompt length -> the rows admitted with it: one prefill each
        with self.lock:
            while self.waiting and free:
                sequence = self.waiting.popleft()
                if sequence.cancelled:
                    sequence.on_finish("cancelled")
                elif sequence.max_tokens == 0:
                    sequence.on_finish("length")
                else:
                    index = free.pop(0)
                    # the row is the sequence's before its prefill runs, so a failing prefill ends it with "error"
                    self.slots[index] = _Slot(sequence, _Row(), first_step=self.launched)
                    joining.setdefault(len(sequence.tokens), []).append(index)
        for n, rows in joining.items():
            width = self._prefill_rows(n)
            for i in range(0, len(rows), width):
                self._prefill(rows[i:i + width])
        busy = any(slot is not None for slot in self.slots)
        handed_out, self.in_flight = self.in_flight, None
        if busy:  # the GPU computes the next column while the host hands out the last one
            self.in_flight = self._launch()
        if handed_out is not None:
            self._hand_out(handed_out)
        return busy or self.in_flight is not None or bool(self.waiting)

    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set, sleeping while idle. A failing step (e.g. out of memory) ends every sequence
        it held with reason "error" and the loop goes on."""
        while not stop.is_set():
            try:
                busy = self.step()
            except Exception:  # noqa: BLE001 - reported to each sequence; the server stays up
                traceback.print_exc()
                for index, slot in enumerate(self.slots):
                    if slot is not None:
                        self._finish(index, "error")
                continue
            if not busy:
                self.wake.wait(0.05)
                self.wake.clear()
