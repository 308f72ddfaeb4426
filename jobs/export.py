"""A checkpoint to and from the Hugging Face transformers format (NanoChat).

    python -m jobs.export --source sft --out DIR              # or s3://bucket/prefix; --run, --model-tag, --step
    python -m jobs.export --import DIR --source sft           # DIR back into the run as checkpoints/sft/<tag>/

The exported folder loads with transformers' own classes (AutoModelForCausalLM / AutoTokenizer, no
trust_remote_code), and so in vLLM and lm-evaluation-harness: config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja and a README.md model card.
Writing and reading it needs no transformers: the files are plain JSON, safetensors and a `tokenizers` BPE.

The mapping (checked in tests/test_export.py against transformers' NanoChatForCausalLM):
- the blocks' linears map one to one (c_q/c_k/c_v/c_proj -> q/k/v/o_proj, c_fc/c_proj -> fc1/fc2);
  there are no norm weights on either side (parameter-free RMSNorm)
- both rotate (first half, second half) pairs with the same sign, then QK-norm; rope_theta 10000
- vibechat's RMSNorm uses torch's default eps, float32's machine epsilon, so rms_norm_eps is that
- logits soft-capped at 15; untied embedding and lm_head; GQA through num_key_value_heads
- the tokenizer: tiktoken's ranks become a byte-level BPE whose merges are every split of every token
  (tiktoken merges the adjacent pair whose join ranks lowest), with ignore_merges as tiktoken looks a whole
  chunk up first; the special tokens keep their ids.
"""

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import asdict

import torch

from jobs.phase import checkpoint_root, largest_model_tag, load_eval_model
from vibechat.checkpoint_manager import build_model, find_last_step, save_checkpoint
from vibechat.common import VibechatError, get_base_dir, nonnegative_int, print0, run_main
from vibechat.gpt import SOFTCAP, GPTConfig
from vibechat.layout import CHECKPOINTS_DIR, EXPORT_DIR, STAGES, join
from vibechat.report import stage_scores, summary_table
from vibechat.storage import LocalStore, Store, open_store
from vibechat.tokenizer import (BYTE_OF_CHAR, RustBPETokenizer, TokenizerError, default_tokenizer_dir,
                                save_token_bytes)

ROPE_THETA = 10000.0  # vibechat.gpt.GPT._rotary_tables' base
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm(x, shape) without eps uses the dtype's epsilon
CHAR_OF_BYTE = {b: c for c, b in BYTE_OF_CHAR.items()}
FILES = ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "generation_config.json", "README.md", "config.json"]  # config.json last: a folder without it is no model

# GPTConfig field -> config.json field; a model_config field not here has no counterpart in the format
CONFIG_FIELDS = {"sequence_len": "max_position_embeddings", "vocab_size": "vocab_size", "n_layer": "num_hidden_layers",
                 "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size"}
# vibechat's weight names -> NanoChat's: in each block (under transformer.h.<i>. / model.layers.<i>.), and outside
BLOCK_WEIGHTS = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
                 "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
MODEL_WEIGHTS = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}

# renders a conversation to exactly the ids of RustBPETokenizer.render_for_completion / render_conversation:
# a system message joins the first user message after a blank line; assistant content is a string or a list of
# {"type": "text" | "python" | "python_output", "text": ...} parts (the calculator tool's call and its output)
CHAT_TEMPLATE = """\
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set messages = messages[1:] -%}
{%- else -%}{%- set system = '' -%}{%- endif -%}
{{- bos_token -}}
{%- for message in messages -%}
  {%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
    {{- raise_exception('roles must alternate user/assistant, starting with user (a system message may come first)') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {{- '<|user_start|>' + (system if loop.first else '') + message['content'] + '<|user_end|>' -}}
  {%- else -%}
    {{- '<|assistant_start|>' -}}
    {%- if message['content'] is string -%}{{- message['content'] -}}
    {%- else -%}{%- for part in message['content'] -%}
      {%- if part['type'] == 'text' -%}{{- part['text'] -}}
      {%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}
      {%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
      {%- else -%}{{- raise_exception('content part type must be text, python or python_output') -}}
      {%- endif -%}
    {%- endfor -%}{%- endif -%}
    {{- '<|assistant_end|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}
"""


class ExportError(VibechatError):
    """A checkpoint or a folder that cannot be converted; the message names the file or field."""


# ----------------------------------------------------------------------------------------------------------
# config and weights


def hf_config(config: GPTConfig, tokenizer: RustBPETokenizer, dtype: torch.dtype) -> dict:
    """config.json of NanoChatForCausalLM for a vibechat GPT."""
    special = tokenizer.encode_special
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        **{theirs: getattr(config, ours) for ours, theirs in CONFIG_FIELDS.items()},
        "intermediate_size": 4 * config.n_embd,
        "head_dim": config.n_embd // config.n_head,
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "final_logit_softcapping": SOFTCAP,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.get_bos_token_id(),
        "eos_token_id": special("<|assistant_end|>"),
        "pad_token_id": special("<|assistant_end|>"),
        "dtype": str(dtype).removeprefix("torch."),
    }


def gpt_config(hf: dict, where: str) -> GPTConfig:
    """The GPTConfig of a NanoChat config.json; a setting vibechat's GPT cannot express is an error naming it."""
    def need(field: str, expected, ok=None) -> None:
        if field not in hf:  # transformers' default for it may not be vibechat's
            raise ExportError(f"{where}: {field} is missing; vibechat's GPT needs {expected!r}")
        value = hf[field]
        if not (ok(value) if ok else value == expected):
            raise ExportError(f"{where}: {field} = {value!r} cannot be expressed by vibechat's GPT, which needs "
                              f"{expected!r}")

    need("model_type", "nanochat")
    for field in CONFIG_FIELDS.values():
        if not isinstance(hf.get(field), int) or hf[field] < 1:
            raise ExportError(f"{where}: {field} must be a positive integer, not {hf.get(field)!r}")
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    need("intermediate_size", 4 * width)
    if "head_dim" in hf:  # else transformers takes hidden_size / num_attention_heads, as vibechat does
        need("head_dim", width // heads)
    need("hidden_act", "relu2")
    need("rms_norm_eps", RMS_NORM_EPS, lambda v: isinstance(v, float) and abs(v - RMS_NORM_EPS) < 1e-12)
    need("rope_parameters", {"rope_type": "default", "rope_theta": ROPE_THETA},
         lambda v: isinstance(v, dict) and v.get("rope_type", "default") == "default" and v.get("rope_theta") == ROPE_THETA)
    need("final_logit_softcapping", SOFTCAP)
    need("attention_bias", False)
    need("tie_word_embeddings", False)
    return GPTConfig(**{ours: hf[theirs] for ours, theirs in CONFIG_FIELDS.items()})


def weight_names(n_layer: int) -> dict[str, str]:
    """vibechat state-dict key -> NanoChat key, for every weight of a model of n_layer blocks."""
    names = dict(MODEL_WEIGHTS)
    for i in range(n_layer):
        names.update({f"transformer.h.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight"
                      for ours, theirs in BLOCK_WEIGHTS.items()})
    return names


def check_model_config(model_config: dict, where: str) -> None:
    """Every field of a checkpoint's model_config has a NanoChat counterpart; else an error naming the field."""
    extra = sorted(set(model_config) - set(CONFIG_FIELDS))
    if extra:
        raise ExportError(f"{where}: model_config field {extra[0]!r} (= {model_config[extra[0]]!r}) has no "
                          f"counterpart in the transformers NanoChat format, which expresses {', '.join(CONFIG_FIELDS)}")


# ----------------------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_json(tokenizer: RustBPETokenizer) -> str:
    """tokenizer.json of a `tokenizers` byte-level BPE that encodes exactly as the tiktoken encoding does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    enc = tokenizer.enc
    ranks = enc._mergeable_ranks

    def chars(token: bytes) -> str:
        return "".join(CHAR_OF_BYTE[b] for b in token)

    merges = []  # (rank of the joined token, rank of left, rank of right, left, right)
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], chars(left), chars(right)))
    merges.sort()
    model = models.BPE(vocab={chars(t): r for t, r in ranks.items()}, merges=[m[3:] for m in merges],
                       ignore_merges=True, fuse_unk=False, byte_fallback=False)
    hf = Tokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(enc._special_tokens.items(), key=lambda item: item[1])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    moved = [name for name, i in specials if hf.token_to_id(name) != i]
    if moved:
        raise ExportError(f"special token {moved[0]!r} does not follow the ordinary tokens (id "
                          f"{enc._special_tokens[moved[0]]}), which tokenizer.json cannot express")
    return hf.to_str()


def tokenizer_from_json(text: str, where: str) -> RustBPETokenizer:
    """The tiktoken encoding back from a tokenizer.json that tokenizer_json wrote (ids are tiktoken's ranks)."""
    import tiktoken

    try:
        data = json.loads(text)
        vocab = data["model"]["vocab"]
        split = next(p for p in data["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split")
        pattern = split["pattern"]["Regex"]
        ranks = {bytes(BYTE_OF_CHAR[c] for c in token): rank for token, rank in vocab.items()}
        special = {t["content"]: t["id"] for t in data["added_tokens"] if t["special"]}
        enc = tiktoken.Encoding(name="vibechat", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        return RustBPETokenizer(enc)
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration, ValueError, TokenizerError) as e:
        raise ExportError(f"{where} is not a byte-level BPE tokenizer with vibechat's special tokens "
                          f"({type(e).__name__}: {e}): only folders written by python -m jobs.export import") from None


def tokenizer_config(tokenizer: RustBPETokenizer, sequence_len: int) -> dict:
    names = sorted(tokenizer.get_special_tokens(), key=tokenizer.encode_special)
    bos = tokenizer.enc.decode([tokenizer.get_bos_token_id()])
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>",
        "extra_special_tokens": [n for n in names if n not in (bos, "<|assistant_end|>")],
        "model_max_length": sequence_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,  # vibechat adds <|bos|> where it means to: the chat template, documents
        "add_eos_token": False,
    }


# ----------------------------------------------------------------------------------------------------------
# export


def model_card(base_dir: str, source: str, model_tag: str, meta: dict) -> str:
    """README.md: what the model is, how it was trained (the run's config of each phase) and its scores."""
    store = open_store(base_dir)
    lines = [f"# vibechat {source} model {model_tag}, step {meta['step']}", "",
             "A small chat model trained end to end with vibechat (nanochat family), in the transformers NanoChat "
             "format: load it with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.", "",
             "## Model", "", "```json", json.dumps(meta["model_config"], indent=2), "```", ""]
    try:
        run = json.loads(store.get_text("run.json"))
    except (FileNotFoundError, json.JSONDecodeError):
        run = None
    if run:
        phases = run.get("config", {}).get("phases", {})
        lines += ["## How it was trained", "", f"Run `{run.get('run_id')}`, preset `{run.get('preset')}`, "
                  f"dataset `{run.get('config', {}).get('dataset')}`. Phases and their arguments:", ""]
        lines += [f"- {name}: " + ("skipped" if p.get("skip") else f"`{json.dumps(p.get('args', {}))}`")
                  for name, p in phases.items()]
        lines.append("")
    elif meta.get("user_config"):
        lines += ["## How it was trained", "", "```json", json.dumps(meta["user_config"], indent=2), "```", ""]
    lines += ["## Evaluation", "", summary_table(stage_scores(store)), ""]
    return "\n".join(lines)


def write_folder(folder: str, model_state: dict, config: GPTConfig, tokenizer: RustBPETokenizer, card: str) -> None:
    """Every file of the export into an empty local folder."""
    from safetensors.torch import save_file

    names = weight_names(config.n_layer)
    tensors = {names[k]: v.contiguous() for k, v in model_state.items()}
    dtype = next(iter(tensors.values())).dtype
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    special = tokenizer.encode_special
    files = {
        "config.json": hf_config(config, tokenizer, dtype),
        "generation_config.json": {"bos_token_id": tokenizer.get_bos_token_id(),
                                   "eos_token_id": [special("<|assistant_end|>"), tokenizer.get_bos_token_id()],
                                   "pad_token_id": special("<|assistant_end|>")},
        "tokenizer_config.json": tokenizer_config(tokenizer, config.sequence_len),
    }
    for name, data in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(data, f, indent=2)
    for name, text in [("tokenizer.json", tokenizer_json(tokenizer)), ("chat_template.jinja", CHAT_TEMPLATE),
                       ("README.md", card)]:
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def prepare_out(out: Store) -> None:
    """--out must be empty or absent; what a cut-short export left there (its files without config.json, the
    commit mark written last) is removed, so a restarted export phase goes on."""
    if isinstance(out, LocalStore) and os.path.exists(out.root) and not os.path.isdir(out.root):
        raise ExportError(f"--out {out.url} is a file: give a folder that is empty or absent")
    found = out.list("")
    if found and set(found) <= set(FILES) - {"config.json"}:
        print0(f"removing an incomplete export from {out.url}: {', '.join(sorted(found))}")
        for name in found:
            out.delete(name)
    elif found:
        state = "an export" if "config.json" in found else "other files"
        raise ExportError(f"--out {out.url} is not empty (it holds {state}, e.g. {sorted(found)[0]}): "
                          "choose a new folder or delete it first")


def publish(folder: str, out: Store) -> None:
    """Move the finished folder to --out: a rename on a local disk, else uploads with config.json last, removed
    again if one fails, so --out never holds half an export."""
    if isinstance(out, LocalStore):
        if os.path.isdir(out.root):
            os.rmdir(out.root)  # empty, checked before
        os.rename(folder, out.root)
        return
    done = []
    try:
        for name in FILES:
            out.put_file(os.path.join(folder, name), name)
            done.append(name)
    except BaseException:
        for name in done:
            out.delete(name)
        raise


def export(source: str, model_tag: str | None, step: int | None, out_url: str) -> str:
    """Write <source>'s checkpoint (largest model, newest step by default) to out_url; returns what was written."""
    out = open_store(out_url)
    prepare_out(out)
    model, tokenizer, meta, model_tag = load_eval_model(source, model_tag, step, torch.device("cpu"))
    where = f"{source} model {model_tag} step {meta['step']}"
    check_model_config(meta["model_config"], where)
    parent = os.path.dirname(out.root) if isinstance(out, LocalStore) else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=".export-", dir=parent)  # beside --out, so the final rename is atomic
    try:
        write_folder(folder, model.state_dict(), model.config, tokenizer,
                     model_card(get_base_dir(), source, model_tag, meta))
        publish(folder, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return where


# ----------------------------------------------------------------------------------------------------------
# import


def read_folder(folder: str) -> tuple[dict, GPTConfig, RustBPETokenizer]:
    """(vibechat state dict, config, tokenizer) of an exported folder (local or store URL)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if os.path.isfile(folder):
        raise ExportError(f"--import {folder} is a file: give the folder python -m jobs.export wrote")
    store = open_store(folder)
    contents = {}
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        try:
            contents[name] = store.get_bytes(name)
        except FileNotFoundError:
            raise ExportError(f"{store.uri(name)} is missing: --import takes a folder written by "
                              "python -m jobs.export (or a NanoChat model saved by transformers)") from None
    try:
        hf = json.loads(contents["config.json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{store.uri('config.json')} is not JSON ({e})") from None
    config = gpt_config(hf, store.uri("config.json"))
    try:
        tensors = load(contents["model.safetensors"])
    except SafetensorError as e:
        raise ExportError(f"{store.uri('model.safetensors')} is not a safetensors file ({e})") from None
    names = {theirs: ours for ours, theirs in weight_names(config.n_layer).items()}
    unknown = sorted(set(tensors) - set(names))
    missing = sorted(set(names) - set(tensors))
    if unknown or missing:
        problem = f"has weight {unknown[0]!r}, which" if unknown else f"lacks weight {missing[0]!r}, which"
        raise ExportError(f"{store.uri('model.safetensors')} {problem} a NanoChat model of config.json "
                          f"({config.n_layer} layers) {'does not have' if unknown else 'needs'}")
    tokenizer = tokenizer_from_json(contents["tokenizer.json"].decode("utf-8"), store.uri("tokenizer.json"))
    if tokenizer.get_vocab_size() != config.vocab_size:  # load_model wants them equal: vibechat pads no vocabulary
        raise ExportError(f"{store.uri('tokenizer.json')} has {tokenizer.get_vocab_size()} tokens but config.json's "
                          f"vocab_size is {config.vocab_size}: vibechat's GPT needs them equal")
    # vibechat trains float32 weights under autocast: a bf16 folder from elsewhere comes back as float32
    return {names[k]: v.float() for k, v in tensors.items()}, config, tokenizer


def import_folder(folder: str, source: str, model_tag: str | None, step: int | None) -> str:
    """Write the folder as a committed checkpoint <base>/checkpoints/<source>/<tag>/ (the run's tokenizer too, if
    the run has none); returns the checkpoint's directory and step."""
    state, config, tokenizer = read_folder(folder)
    meta = {"step": 0, "model_config": asdict(config), "imported_from": folder}
    model = build_model(state, meta, "cpu", "eval")  # the shapes match the config, or one clear error
    tokenizer_dir = default_tokenizer_dir()
    try:
        theirs = RustBPETokenizer.from_directory(tokenizer_dir)
    except TokenizerError:
        theirs = None
    if theirs is not None and (theirs.enc._mergeable_ranks != tokenizer.enc._mergeable_ranks
                               or theirs.enc._special_tokens != tokenizer.enc._special_tokens):
        raise ExportError(f"{folder}'s tokenizer differs from the run's ({tokenizer_dir}): import into a new run "
                          "(another VIBECHAT_RUN), where it becomes the run's tokenizer")
    model_tag = model_tag or f"d{config.n_layer}"
    target = join(checkpoint_root(source), model_tag)
    try:
        newest = find_last_step(target)
    except FileNotFoundError:
        newest = None
    step = (0 if newest is None else newest + 1) if step is None else step
    if open_store(target).exists(f"meta_{step:06d}.json"):
        raise ExportError(f"{target} already has a checkpoint at step {step}: choose another --step or "
                          "--model-tag")
    if theirs is None:
        tokenizer.save(tokenizer_dir)
        save_token_bytes(tokenizer, tokenizer_dir)
    save_checkpoint(target, step, model.state_dict(), None, {**meta, "step": step})
    return f"{target} step {step}"


# ----------------------------------------------------------------------------------------------------------


def last_stage() -> str:
    """The latest stage (rl, sft, mid, base) with a checkpoint in this run: what the pipeline's export phase writes."""
    stage = next((stage for stage in reversed(STAGES) if largest_model_tag(stage)), None)
    if stage is None:
        raise ExportError(f"no checkpoint in {join(get_base_dir(), CHECKPOINTS_DIR)}: train a model first "
                          "(python -m jobs.base_train)")
    return stage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=(
        "Write a checkpoint as a transformers NanoChat folder, or bring one back with --import."))
    parser.add_argument("--run", default=None,
                        help="the run in $VIBECHAT_STORE to export from or import into (default: $VIBECHAT_RUN)")
    parser.add_argument("--import", dest="import_dir", metavar="DIR",
                        help="an exported folder (or store URL) to turn into a checkpoint of --source")
    parser.add_argument("--out", default=None,
                        help=f"folder or store URL (s3://...) to export to, empty or absent (default: the run's {EXPORT_DIR})")
    parser.add_argument("--source", default=None, choices=STAGES,
                        help="which phase's checkpoint to export (default: the latest stage that has one), "
                             "or to import as (required)")
    parser.add_argument("--model-tag", default=None,
                        help="model tag (export: default the largest; import: default d<layers>)")
    parser.add_argument("--step", type=nonnegative_int, default=None,
                        help="checkpoint step (export: default the newest; import: default the next free one)")
    args = parser.parse_args(argv)
    if args.import_dir is not None and args.out is not None:
        parser.error("--import and --out do not go together: --import reads a folder, --out writes one")
    if args.import_dir is not None and args.source is None:
        parser.error("--import needs --source: the phase the model joins as (base, mid, sft or rl)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # several copies would race for the same --out
        raise ExportError("export runs as one process: give its phase nproc_per_node 1 and nnodes 1")
    if args.run:  # get_base_dir() is then <store>/runs/<run>, as in a phase the controller starts
        os.environ.pop("VIBECHAT_BASE_DIR", None)
        os.environ["VIBECHAT_RUN"] = args.run
    if args.import_dir is not None:
        what = import_folder(args.import_dir, args.source, args.model_tag, args.step)
        print0(f"imported {args.import_dir} as {what}")
        return
    source = args.source or last_stage()
    out = args.out or join(get_base_dir(), EXPORT_DIR)
    what = export(source, args.model_tag, args.step, out)
    print0(f"exported {what} to {out}")


if __name__ == "__main__":
    run_main(main)
