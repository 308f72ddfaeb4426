"""Checkpoints in the store.

<checkpoint_dir>/model_<step>.pt           model weights (rank 0)
<checkpoint_dir>/optim_<step>_rank<r>.pt   each rank's optimizer state (sharded optimizers differ per rank)
<checkpoint_dir>/meta_<step>.json          written LAST, after every rank's files: the commit mark

A checkpoint without its meta file does not exist: a phase killed mid-save leaves nothing visible. The meta holds
the SHA-256 of every file of its step under "files"; loading a file checks it, so a flipped byte is an error naming
the file, never a silently different model. checkpoint_dir may be a local path, file:// or s3:// URL.
"""

import hashlib
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


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _put_torch(store, key: str, obj) -> str:
    """Save obj under key; returns the file's SHA-256 for the meta."""
    # through a temp file, so large checkpoints go to S3 as multipart uploads
    with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
        torch.save(obj, f)
    try:
        digest = _sha256_file(f.name)
        store.put_file(f.name, key)
    finally:
        os.remove(f.name)
    return digest


def _get_torch(store, key: str, device, meta: dict, meta_key: str):
    try:
        data = store.get_bytes(key)
    except FileNotFoundError:
        raise VibechatError(f"checkpoint file {store.uri(key)} is missing: the checkpoint is incomplete; "
                            "delete its meta file or resume from an earlier step") from None
    expected = meta.get("files", {}).get(key)  # checkpoints written before digests have none
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise VibechatError(f"checkpoint file {store.uri(key)} is truncated or corrupt: its SHA-256 differs from "
                            f"the one recorded in {meta_key}; delete this step's files (meta first) to fall back to "
                            "the previous checkpoint")
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=False)
    except Exception as e:
        raise VibechatError(f"checkpoint file {store.uri(key)} is truncated or corrupt ({type(e).__name__}): "
                            "delete it and its meta file to fall back to the previous checkpoint") from None


def _meta_problem(meta) -> str | None:
    """What is wrong with a parsed meta file, or None: every loader relies on step, model_config and files."""
    from vibechat.gpt import GPTConfig

    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"has step {step!r}, not a step number"
    config = meta.get("model_config")
    known = {f.name for f in fields(GPTConfig)}  # a field it does not know is build_model's error: another version
    if not isinstance(config, dict) or not all(isinstance(config[k], int) and not isinstance(config[k], bool)
                                               and config[k] > 0 for k in known & set(config)):
        return f"has model_config {config!r}, not a mapping of {', '.join(sorted(known))} to positive integers"
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return f"has files {files!r}, not a mapping of file names to SHA-256 digests"
    return None


def read_meta(checkpoint_dir: str, step: int) -> dict:
    """The meta file of a committed step; FileNotFoundError if it is absent, one clear error naming it if unusable."""
    store = open_store(checkpoint_dir)
    key = f"meta_{step:06d}.json"
    data = store.get_bytes(key)
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"is corrupt ({type(e).__name__})"
    else:
        problem = _meta_problem(meta)
    if problem:
        raise VibechatError(f"checkpoint meta file {store.uri(key)} {problem}: delete it to fall back to the "
                            "previous checkpoint")
    return meta


def save_checkpoint(checkpoint_dir: str, step: int, model_data: dict, optimizer_data: dict | None,
                    meta_data: dict) -> None:
    """Save one step. Call on every rank: each writes its optimizer shard; rank 0 writes the model, then the meta
    with every file's SHA-256."""
    store = open_store(checkpoint_dir)
    ddp, rank, _, world_size = get_dist_info()
    files = {}
    if rank == 0:
        key = f"model_{step:06d}.pt"
        files[key] = _put_torch(store, key, model_data)
    if optimizer_data is not None:
        key = f"optim_{step:06d}_rank{rank}.pt"
        files[key] = _put_torch(store, key, optimizer_data)
    if ddp and dist.is_initialized():
        # every rank's files are in the store before the commit mark, and rank 0 knows their digests
        gathered = [None] * world_size
        dist.all_gather_object(gathered, files)
        files = {k: v for rank_files in gathered for k, v in rank_files.items()}
    if rank == 0:
        store.put_text(f"meta_{step:06d}.json", json.dumps({**meta_data, "files": files}, indent=2))


def load_checkpoint(checkpoint_dir: str, step: int, device, load_optimizer: bool = False,
                    rank: int | None = None) -> tuple[dict, dict | None, dict]:
    """(model_data, optimizer_data of this rank or None, meta_data) of a committed checkpoint."""
    try:
        meta = read_meta(checkpoint_dir, step)
    except FileNotFoundError:
        raise VibechatError(f"no checkpoint at step {step} in {checkpoint_dir} (no meta_{step:06d}.json)") from None
    store = open_store(checkpoint_dir)
    model_data = _get_torch(store, f"model_{step:06d}.pt", device, meta, f"meta_{step:06d}.json")
    optimizer_data = load_optimizer_state(checkpoint_dir, step, device, rank) if load_optimizer else None
    return model_data, optimizer_data, meta


def load_optimizer_state(checkpoint_dir: str, step: int, device, rank: int | None = None) -> dict:
    """This rank's optimizer file of a checkpoint (optimizer states, data position, RNG)."""
    rank = get_dist_info()[1] if rank is None else rank
    return _get_torch(open_store(checkpoint_dir), f"optim_{step:06d}_rank{rank}.pt", device,
                      read_meta(checkpoint_dir, step), f"meta_{step:06d}.json")


def find_last_step(checkpoint_dir: str) -> int:
    """The newest committed step (one with a meta file); raises FileNotFoundError if there is none."""
    steps = [int(m.group(1)) for key in open_store(checkpoint_dir).list("")
             if (m := re.fullmatch(r"meta_(\d+)\.json", key.rsplit("/", 1)[-1])) and "/" not in key]
    if not steps:
        raise FileNotFoundError(f"no committed checkpoint in {checkpoint_dir}")
    return max(steps)


def prune_checkpoints(checkpoint_dir: str, keep_last: int) -> list[int]:
    """Delete every step older than the newest keep_last committed ones (0 keeps all); returns the steps deleted.
    Each meta goes first, so a step is uncommitted before its files go; leftovers of killed saves go too."""
    store = open_store(checkpoint_dir)
    files = {}  # step -> its files
    for key in store.list(""):
        if m := re.fullmatch(r"(?:model|optim|meta)_(\d+)(?:_rank\d+)?\.(?:pt|json)", key):
            files.setdefault(int(m.group(1)), []).append(key)
    committed = sorted(step for step, keys in files.items() if f"meta_{step:06d}.json" in keys)
    if keep_last == 0 or len(committed) <= keep_last:
        return []
    doomed = sorted(step for step in files if step < committed[-keep_last])
    for step in doomed:
        for key in sorted(files[step], key=lambda k: not k.startswith("meta_")):
            store.delete(key)
    return [step for step in doomed if step in committed]


def model_tags(checkpoint_dir: str) -> list[str]:
    """The model tags (sub-folders) of a stage's checkpoint folder, sorted."""
    return sorted({key.split("/", 1)[0] for key in open_store(checkpoint_dir).list("") if "/" in key})


def find_largest_model(checkpoint_dir: str) -> str:
    """The model tag with the largest depth (d20 over d12); other tags by newest checkpoint."""
    tags = model_tags(checkpoint_dir)
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
    if model_tag is not None:
        tags = model_tags(root)
        if tags and model_tag not in tags:
            raise VibechatError(f"no model tag {model_tag!r} in {root}: it has {', '.join(tags)}")
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
