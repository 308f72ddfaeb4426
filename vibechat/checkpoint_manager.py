"""Checkpoints in the store.

<checkpoint_dir>/model_<step>.pt           model weights (rank 0)
<checkpoint_dir>/optim_<step>_rank<r>.pt   each rank's optimizer state (sharded optimizers differ per rank)
<checkpoint_dir>/meta_<step>.json          written LAST, after every rank's files: the commit mark

A checkpoint without its meta file does not exist: a phase killed mid-save leaves nothing visible.
checkpoint_dir may be a local path, file:// or s3:// URL.
"""

import io
import json
import os
import re
import tempfile
from dataclasses import fields

import torch
import torch.distributed as dist

from vibechat.common import VibechatError, get_base_dir, get_dist_info
from vibechat.layout import STAGES, TOKENIZER_DIR, checkpoint_dir, join
from vibechat.storage import open_store

# the program that trains each stage, for the hint of a "run it first" error
TRAINING_PROGRAMS = {"base": "jobs.base_train", "mid": "jobs.mid_train", "sft": "jobs.chat_sft", "rl": "jobs.chat_rl"}


def _put_torch(store, key: str, obj) -> None:
    # through a temp file, so large checkpoints go to S3 as multipart uploads
    with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
        torch.save(obj, f)
    try:
        store.put_file(f.name, key)
    finally:
        os.remove(f.name)


def _get_torch(store, key: str, device):
    try:
        data = store.get_bytes(key)
    except FileNotFoundError:
        raise VibechatError(f"checkpoint file {store.uri(key)} is missing: the checkpoint is incomplete; "
                            "delete its meta file or resume from an earlier step") from None
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=False)
    except Exception as e:
        raise VibechatError(f"checkpoint file {store.uri(key)} is truncated or corrupt ({type(e).__name__}): "
                            "delete it and its meta file to fall back to the previous checkpoint") from None


def save_checkpoint(checkpoint_dir: str, step: int, model_data: dict, optimizer_data: dict | None,
                    meta_data: dict) -> None:
    """Save one step. Call on every rank: each writes its optimizer shard; rank 0 writes the model, then the meta."""
    store = open_store(checkpoint_dir)
    ddp, rank, _, _ = get_dist_info()
    if rank == 0:
        _put_torch(store, f"model_{step:06d}.pt", model_data)
    if optimizer_data is not None:
        _put_torch(store, f"optim_{step:06d}_rank{rank}.pt", optimizer_data)
    if ddp and dist.is_initialized():
        dist.barrier()  # every rank's files are in the store before the commit mark
    if rank == 0:
        store.put_text(f"meta_{step:06d}.json", json.dumps(meta_data, indent=2))


def load_checkpoint(checkpoint_dir: str, step: int, device, load_optimizer: bool = False,
                    rank: int | None = None) -> tuple[dict, dict | None, dict]:
    """(model_data, optimizer_data of this rank or None, meta_data) of a committed checkpoint."""
    store = open_store(checkpoint_dir)
    meta_key = f"meta_{step:06d}.json"
    try:
        meta = json.loads(store.get_text(meta_key))
    except FileNotFoundError:
        raise VibechatError(f"no checkpoint at step {step} in {checkpoint_dir} (no {meta_key})") from None
    except json.JSONDecodeError:
        raise VibechatError(f"checkpoint meta file {store.uri(meta_key)} is corrupt: delete it to fall back "
                            "to the previous checkpoint") from None
    model_data = _get_torch(store, f"model_{step:06d}.pt", device)
    optimizer_data = load_optimizer_state(checkpoint_dir, step, device, rank) if load_optimizer else None
    return model_data, optimizer_data, meta


def load_optimizer_state(checkpoint_dir: str, step: int, device, rank: int | None = None) -> dict:
    """This rank's optimizer file of a checkpoint (optimizer states, data position, RNG)."""
    rank = get_dist_info()[1] if rank is None else rank
    return _get_torch(open_store(checkpoint_dir), f"optim_{step:06d}_rank{rank}.pt", device)


def find_last_step(checkpoint_dir: str) -> int:
    """The newest committed step (one with a meta file); raises FileNotFoundError if there is none."""
    steps = [int(m.group(1)) for key in open_store(checkpoint_dir).list("")
             if (m := re.fullmatch(r"meta_(\d+)\.json", key.rsplit("/", 1)[-1])) and "/" not in key]
    if not steps:
        raise FileNotFoundError(f"no committed checkpoint in {checkpoint_dir}")
    return max(steps)


def find_largest_model(checkpoint_dir: str) -> str:
    """The model tag with the largest depth (d20 over d12); other tags by newest checkpoint."""
    store = open_store(checkpoint_dir)
    tags = sorted({key.split("/", 1)[0] for key in store.list("") if "/" in key})
    if not tags:
        raise FileNotFoundError(f"no models in {checkpoint_dir}")
    depth_tags = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depth_tags:
        return max(depth_tags)[1]
    return tags[-1]


def build_model(model_data: dict, meta: dict, device, phase: str):
    """A GPT from a checkpoint's weights and its meta's model_config; a mismatch is one clear error."""
    from vibechat.gpt import GPT, GPTConfig

    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(meta["model_config"]) - known)
    if unknown:
        raise VibechatError(f"checkpoint model_config field {unknown[0]!r} (= {meta['model_config'][unknown[0]]!r}) "
                            f"is not one of this vibechat's GPTConfig ({', '.join(sorted(known))}): the checkpoint "
                            "is from another version of the model; load it with that version")
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills the rotary buffers; weights come from the checkpoint
    # torch.compile prefixes keys with _orig_mod.
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    try:
        model.load_state_dict(model_data, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise VibechatError(f"checkpoint weights do not match its model_config {meta['model_config']} ({first}): "
                            "the checkpoint is from another architecture; point at the right run or retrain") from None
    model.to(device)
    if phase == "eval":
        model.eval()
    else:
        model.train()
    return model


def load_model(source: str, device, phase: str, model_tag: str | None = None, step: int | None = None):
    """(model, tokenizer, meta) from <base>/checkpoints/<source>/<model_tag>/, newest step by default."""
    from vibechat.tokenizer import get_tokenizer

    if source not in STAGES:
        raise VibechatError(f"unknown model source {source!r}: use one of {', '.join(STAGES)}")
    root = join(get_base_dir(), checkpoint_dir(source))
    try:
        model_tag = model_tag or find_largest_model(root)
        step = find_last_step(join(root, model_tag)) if step is None else step
    except FileNotFoundError:
        raise VibechatError(f"no {source!r} checkpoint in {root}: run the {source} phase first "
                            f"(python -m {TRAINING_PROGRAMS[source]})") from None
    model_data, _, meta = load_checkpoint(join(root, model_tag), step, device)
    model = build_model(model_data, meta, device, phase)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise VibechatError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the {source} model expects "
                            f"{model.config.vocab_size}: the tokenizer in {join(get_base_dir(), TOKENIZER_DIR)} is "
                            "from another run")
    return model, tokenizer, meta
