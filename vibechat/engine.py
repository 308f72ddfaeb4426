"""Inference: a preallocated KV cache, and an Engine that streams samples with calculator tool use.

The prompt is prefilled once at batch 1 and its cache copied into every sample's row. Decoding then
runs one token per step over a cache preallocated to the longest sequence, at a position held on the
device, so every step has the same shapes: on CUDA the step is compiled and captured as a CUDA graph
once per (batch size, cache length, top_k) and replayed for each token; elsewhere it runs eagerly. The step
samples too (Gumbel-max over the top_k logits, with uniform noise drawn from the request's seeded generator
before each step), so a token costs two launches: the noise and the graph. The one host sync per step is
reading the new token column, which the stream yields and tool use inspects.
"""

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vibechat.calculator import use_calculator
from vibechat.common import VibechatError

CACHE_BUCKET = 256  # decode caches are sized in multiples of this, so one captured graph serves many requests


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
    """A KVCache as the decode step sees it: one token written at a position held on the device, and the
    whole buffers read back, the attention mask hiding what lies past the position. With no host int in the
    step, one capture of it replays at every position."""

    def __init__(self, cache: KVCache, pos: torch.Tensor):
        self.cache = cache
        self.pos = pos  # (1,) long

    def get_pos(self) -> torch.Tensor:
        return self.pos

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.k[layer_idx], self.cache.v[layer_idx]
        keys[:, :, self.pos] = k
        values[:, :, self.pos] = v
        return keys, values


def _decode_step(model, tokens: torch.Tensor, cache: _StepCache) -> torch.Tensor:
    logits = model(tokens, kv_cache=cache)[:, -1, :]
    cache.pos.add_(1)
    return logits


def _decode_and_sample(model, tokens: torch.Tensor, cache: _StepCache, noise: torch.Tensor, temperature: torch.Tensor,
                       top_k: int) -> torch.Tensor:
    """Feed `tokens` at the cache's position and sample the next ones into `tokens` (returned too)."""
    tokens.copy_(gumbel_sample(_decode_step(model, tokens, cache), noise, temperature, top_k))
    return tokens


def _cuda_graph(fn):
    """Record fn's kernels once; the returned function replays them and returns fn's output tensor, rewritten."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile, autotune and allocate before capturing
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


class _Decoder:
    """The decode step at one batch size, cache length and top_k: feeds `tokens` at `pos`, samples the next
    column into `tokens` with `noise` (refilled by the caller) at `temperature`, and advances `pos`. Its buffers
    live as long as the Engine, at fixed addresses, as a captured graph needs."""

    def __init__(self, model, batch_size: int, seq_len: int, top_k: int, dtype: torch.dtype, device: torch.device,
                 cuda_graph: bool):
        config = model.config
        self.cache = KVCache(batch_size, config.n_kv_head, seq_len, config.n_embd // config.n_head, config.n_layer)
        self.cache._allocate(dtype, device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.noise = torch.full((batch_size, top_k), 0.5, device=device)
        self.temperature = torch.ones(1, device=device)
        args = (self.tokens, _StepCache(self.cache, self.pos), self.noise, self.temperature, top_k)
        if cuda_graph:
            compiled = torch.compile(_decode_and_sample, dynamic=False)  # one static graph per shape and top_k
            self.step = _cuda_graph(lambda: compiled(model, *args))
        else:
            self.step = lambda: _decode_and_sample(model, *args)

    def start(self, prefill: KVCache, first: torch.Tensor, temperature: float) -> None:
        self.cache.prefill(prefill)
        self.pos.fill_(prefill.pos)
        self.tokens.copy_(first)
        self.temperature.fill_(temperature)


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
                  top_k: int) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids drawn from the softmax of the top_k logits at `temperature`, given (B, top_k)
    uniform noise: argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T). No host sync, no
    data-dependent shape, so it runs inside a captured decode step. top_k 1 is greedy (noise is then unused)."""
    if top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
    else:
        values, indices = logits, None
    choice = (values.float() / temperature - torch.log(-torch.log(noise))).argmax(dim=-1, keepdim=True)
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

    A captured decode step reads the weights where they lie: updating them in place (an optimizer step) is
    seen, replacing the tensors (load_state_dict(assign=True), model.to(dtype)) needs a new Engine.
    """

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        # the compiled, graph-captured decode step needs CUDA; set False to decode eagerly there too
        self.use_cuda_graph = model.get_device().type == "cuda"
        self._decoders: dict[tuple, _Decoder] = {}
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
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        config = model.config
        prefill = KVCache(1, config.n_kv_head, len(tokens), config.n_embd // config.n_head, config.n_layer)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = model(ids, kv_cache=prefill)[:, -1, :].expand(num_samples, -1)
        temperature, k = _sampling(temperature, top_k, config.vocab_size)
        # the last step's input is at position max_len - 2
        decoder = self._decoder(num_samples, -(-(max_len - 1) // CACHE_BUCKET) * CACHE_BUCKET, k, prefill)
        # after building: capturing ran warm-up steps on the buffers
        decoder.start(prefill, gumbel_sample(logits, self._noise(decoder, rng, k), temperature, k), temperature)

        rows = [_Row() for _ in range(num_samples)]
        for step in range(max_len - len(tokens)):
            if step > 0:
                self._noise(decoder, rng, k)
                decoder.step()
            column = decoder.tokens.view(-1).tolist()  # the step's one host sync
            masks = [1] * num_samples
            for i, row in enumerate(rows):
                if row.forced:
                    column[i], masks[i] = row.forced.popleft(), 0
                if not row.done:
                    self._advance(row, column[i])
            yield column, masks
            if all(row.done for row in rows):
                return
            if not all(masks):  # tool output replaces sampled tokens as the next input
                decoder.tokens.copy_(torch.tensor(column, device=device).view(-1, 1))

    @staticmethod
    def _noise(decoder: _Decoder, rng: torch.Generator, k: int) -> torch.Tensor:
        """Fresh uniform noise for the next draw, from the request's seeded generator (greedy needs none)."""
        if k > 1:
            torch.rand(decoder.noise.shape, generator=rng, device=decoder.noise.device, out=decoder.noise)
        return decoder.noise

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
