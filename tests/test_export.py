"""python -m jobs.export: checkpoints as transformers NanoChat folders, checked against transformers' own classes."""

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import jobs.export
from jobs.config import load_config
from jobs.export import export, import_folder
from jobs.pipeline import phase_argv
from tests.phase_fixtures import REPO, make_store, phase_env, run_phase, sample_texts
from vibechat.checkpoint_manager import build_model, find_last_step, load_checkpoint, save_checkpoint
from vibechat.common import VibechatError
from vibechat.dataset import pydocs_documents
from vibechat.gpt import GPT, GPTConfig
from vibechat.metrics import read_metrics
from vibechat.storage import open_store
from vibechat.tokenizer import RustBPETokenizer, save_token_bytes

UNICODE_TEXTS = ["héllo wörld, ça va? naïve café", "你好，世界。日本語のテキスト", "emoji 🙂🚀 and ZWJ 👩‍👩‍👧",
                 "Ελληνικά και русский текст", "tabs\tand\r\nwindows lines", "    four leading spaces", "a   b",
                 "x = [1, 22, 333, 4444, 55555]", "1234567890", "trailing spaces   ", "\n\n\n", "   \n  \t \n",
                 "can't won't I'll we've they're", "¡¿‽…—–«»", "\u00a0non-breaking\u2003em space", ""]


@dataclass
class Exported:
    base: str  # the run's base dir
    out: str  # the exported folder
    model: GPT
    tokenizer: RustBPETokenizer


def export_cli(base: str, *args: str) -> subprocess.CompletedProcess:
    return run_phase("jobs.export", list(args), {"VIBECHAT_BASE_DIR": base})


def save_random_model(base: str, source: str, config: GPTConfig, **meta) -> GPT:
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    for p in model.parameters():  # away from init, where every block is the identity
        p.data.normal_(std=0.3)
    save_checkpoint(f"{base}/checkpoints/{source}/d{config.n_layer}", 0, model.state_dict(), None,
                    {"step": 0, "model_config": {**asdict(config), **meta}})
    return model


def save_tokenizer(base: str, vocab_size: int) -> RustBPETokenizer:
    tokenizer = RustBPETokenizer.train_from_iterator(iter(sample_texts(200, seed=9) + UNICODE_TEXTS * 4), vocab_size)
    tokenizer.save(f"{base}/tokenizer")
    save_token_bytes(tokenizer, f"{base}/tokenizer")
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Exported:
    """A random GQA model (4 query heads, 2 key/value heads) as an sft checkpoint, exported by the CLI."""
    base = str(tmp_path_factory.mktemp("tiny"))
    tokenizer = save_tokenizer(base, 400)
    model = save_random_model(base, "sft", GPTConfig(sequence_len=256, vocab_size=400, n_layer=2, n_head=4,
                                                     n_kv_head=2, n_embd=64))
    result = export_cli(base, "--source", "sft", "--out", f"{base}/hf")
    assert result.returncode == 0, result.stderr
    return Exported(base, f"{base}/hf", model.eval(), tokenizer)


@pytest.fixture(scope="module")
def ci(tmp_path_factory) -> Exported:
    """A base model trained by base_train with the ci preset's arguments, exported to the run's export/hf."""
    root = str(tmp_path_factory.mktemp("ci"))
    env = make_store(root)
    result = run_phase("jobs.base_train", phase_argv("base", load_config("ci")["phases"]["base"]["args"]), env)
    assert result.returncode == 0, result.stderr
    result = run_phase("jobs.export", [], env)  # the pipeline's call: the latest stage, into the run
    assert result.returncode == 0, result.stderr
    base = f"{root}/runs/r1"
    checkpoint_dir = f"{base}/checkpoints/base/d2"
    model_data, _, meta = load_checkpoint(checkpoint_dir, find_last_step(checkpoint_dir), "cpu")
    return Exported(base, f"{base}/export/hf", build_model(model_data, meta, "cpu", "eval"),
                    RustBPETokenizer.from_directory(f"{base}/tokenizer"))


@pytest.fixture(params=["tiny", "ci"])
def exported(request) -> Exported:
    return request.getfixturevalue(request.param)


def test_the_folder_holds_the_files_of_the_format_and_nothing_else(tiny):
    assert sorted(os.listdir(tiny.out)) == ["README.md", "chat_template.jinja", "config.json", "generation_config.json",
                                            "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_transformers_nanochat_logits_equal_vibechat_gpt_logits(exported):
    hf = AutoModelForCausalLM.from_pretrained(exported.out, dtype=torch.float32)
    assert type(hf).__name__ == "NanoChatForCausalLM"
    torch.manual_seed(1)
    ids = torch.randint(0, exported.model.config.vocab_size, (3, 100))
    with torch.no_grad():
        ours, theirs = exported.model(ids), hf(ids).logits
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_greedy_generation_agrees_for_32_tokens(exported):
    hf = AutoModelForCausalLM.from_pretrained(exported.out, dtype=torch.float32)
    prompt = exported.tokenizer.encode("the model reads text", prepend="<|bos|>")
    ours = list(exported.model.generate(prompt, max_tokens=32, temperature=0))
    hf.generation_config.eos_token_id = None  # no stop tokens: both run the full 32 tokens
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert theirs == ours


def test_autotokenizer_encodes_and_decodes_like_the_vibechat_tokenizer(tiny):
    hf = AutoTokenizer.from_pretrained(tiny.out)
    texts = UNICODE_TEXTS + sample_texts(20, seed=3)
    assert [hf(t)["input_ids"] for t in texts] == [tiny.tokenizer.encode(t) for t in texts]
    assert [hf.decode(tiny.tokenizer.encode(t)) for t in texts] == texts


def test_autotokenizer_encodes_the_python_docs_like_the_vibechat_tokenizer(tmp_path):
    documents = pydocs_documents()
    tokenizer = RustBPETokenizer.train_from_iterator(iter(documents[:300]), 2048)
    with open(tmp_path / "tokenizer.json", "w") as f:
        f.write(jobs.export.tokenizer_json(tokenizer))
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump(jobs.export.tokenizer_config(tokenizer, 1024), f)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    others = documents[300:800]
    assert hf(others)["input_ids"] == tokenizer.encode(others)


def test_special_token_strings_in_text_are_plain_text_with_split_special_tokens(tiny):
    # vibechat never reads a special token out of text; transformers does by default (its chat template relies on
    # it), and split_special_tokens=True is vibechat's behaviour
    hf = AutoTokenizer.from_pretrained(tiny.out)
    text = "say <|assistant_end|> or <|bos|><|python_start|>1+1"
    assert hf(text, split_special_tokens=True)["input_ids"] == tiny.tokenizer.encode(text)
    assert tiny.tokenizer.encode_special("<|assistant_end|>") in hf(text)["input_ids"]


def test_special_tokens_keep_their_ids_and_roles(tiny):
    hf = AutoTokenizer.from_pretrained(tiny.out)
    special = tiny.tokenizer.encode_special
    assert hf.bos_token_id == tiny.tokenizer.get_bos_token_id()
    assert hf.eos_token_id == special("<|assistant_end|>")
    for name in ("<|user_start|>", "<|user_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                 "<|output_end|>"):
        assert hf.convert_tokens_to_ids(name) == special(name)
    assert hf("hello")["input_ids"] == tiny.tokenizer.encode("hello")  # no BOS added behind the caller's back


CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "hello there"}],
    "system message and several turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine, and you?"},
        {"role": "user", "content": "  spaced   out \n text "}],
    "calculator tool use": [
        {"role": "user", "content": "What is 12 * 34?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "12 * 34"},
            {"type": "python_output", "text": "408"}, {"type": "text", "text": " It is 408."}]},
        {"role": "user", "content": "and plus 1? ünïcödé 🙂"}],
}


@pytest.mark.parametrize("messages", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_chat_template_renders_the_ids_of_render_for_completion(tiny, messages):
    hf = AutoTokenizer.from_pretrained(tiny.out)
    expected = tiny.tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(rendered["input_ids"]) == expected


def test_chat_template_renders_a_whole_conversation_as_render_conversation(tiny):
    hf = AutoTokenizer.from_pretrained(tiny.out)
    messages = CONVERSATIONS["calculator tool use"][:2]
    ids, _ = tiny.tokenizer.render_conversation({"messages": messages})
    assert list(hf.apply_chat_template(messages, tokenize=True)["input_ids"]) == ids


def test_chat_template_refuses_roles_out_of_order(tiny):
    hf = AutoTokenizer.from_pretrained(tiny.out)
    with pytest.raises(Exception, match="roles must alternate user/assistant"):
        hf.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)


def test_config_and_generation_config_name_the_special_tokens(tiny):
    config = json.load(open(f"{tiny.out}/config.json"))
    special = tiny.tokenizer.encode_special
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    generation = json.load(open(f"{tiny.out}/generation_config.json"))
    assert generation["eos_token_id"] == [special("<|assistant_end|>"), special("<|bos|>")]  # the Engine's stops


def test_model_card_has_the_runs_summary_table_and_how_it_was_trained(ci):
    card = open(f"{ci.out}/README.md").read()
    assert card.startswith("# vibechat base model d2, step 4")
    assert "## How it was trained" in card and '"num_iterations": 4' in card
    assert "| Metric | BASE | MID | SFT | RL |" in card


def test_run_names_the_run_of_the_store_to_export_from(ci, tmp_path):
    store = os.path.dirname(os.path.dirname(ci.base))
    result = run_phase("jobs.export", ["--run", "r1", "--source", "base", "--out", str(tmp_path / "hf")],
                       {"VIBECHAT_STORE": store})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"exported base model d2 step 4 to {tmp_path}/hf"


def test_export_then_import_round_trips_the_weights_exactly(tiny, tmp_path):
    base = str(tmp_path / "other-run")
    result = export_cli(base, "--import", tiny.out, "--source", "sft")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"imported {tiny.out} as {base}/checkpoints/sft/d2 step 0"
    model_data, _, meta = load_checkpoint(f"{base}/checkpoints/sft/d2", 0, "cpu")
    original = tiny.model.state_dict()
    assert model_data.keys() == original.keys()
    assert all(torch.equal(model_data[k], original[k]) for k in original)
    assert meta["model_config"] == asdict(tiny.model.config)
    tokenizer = RustBPETokenizer.from_directory(f"{base}/tokenizer")  # the run had none: it is the folder's
    assert tokenizer.enc.__getstate__() == tiny.tokenizer.enc.__getstate__()  # ranks, specials, split pattern
    assert os.path.exists(f"{base}/tokenizer/token_bytes.pt")


def test_an_import_beside_existing_checkpoints_takes_the_next_step(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VIBECHAT_BASE_DIR", str(tmp_path))
    assert import_folder(tiny.out, "rl", None, None).endswith("checkpoints/rl/d2 step 0")
    assert import_folder(tiny.out, "rl", None, None).endswith("checkpoints/rl/d2 step 1")
    with pytest.raises(VibechatError, match="already has a checkpoint at step 1: choose another --step"):
        import_folder(tiny.out, "rl", None, 1)


def test_export_to_s3_and_import_from_it_round_trips(tiny, s3_url, monkeypatch):
    monkeypatch.setenv("VIBECHAT_BASE_DIR", tiny.base)
    export("sft", None, None, f"{s3_url}/hf")
    assert sorted(open_store(f"{s3_url}/hf").list("")) == sorted(jobs.export.FILES)
    monkeypatch.setenv("VIBECHAT_BASE_DIR", f"{s3_url}/run")
    import_folder(f"{s3_url}/hf", "sft", None, None)
    model_data, _, _ = load_checkpoint(f"{s3_url}/run/checkpoints/sft/d2", 0, "cpu")
    assert all(torch.equal(model_data[k], v) for k, v in tiny.model.state_dict().items())


# --- bad input ---------------------------------------------------------------------------------------------


def assert_one_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_checkpoint_is_one_error_and_writes_nothing(tmp_path):
    base = str(tmp_path)
    save_tokenizer(base, 300)
    result = export_cli(base, "--source", "mid", "--out", f"{base}/hf")
    assert_one_error(result, f"no 'mid' checkpoint in {base}/checkpoints/mid: run the mid phase first "
                             "(python -m jobs.mid_train)")
    assert sorted(os.listdir(base)) == ["tokenizer"]


def test_the_pipelines_call_without_any_checkpoint_says_to_train_first(tmp_path):
    result = export_cli(str(tmp_path))
    assert_one_error(result, f"no checkpoint in {tmp_path}/checkpoints: train a model first (python -m jobs.base_train)")
    assert os.listdir(tmp_path) == []


def test_a_non_empty_out_is_one_error_and_keeps_what_is_there(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = export_cli(tiny.base, "--source", "sft", "--out", str(tmp_path))
    assert_one_error(result, f"--out {tmp_path} is not empty (it holds other files, e.g. notes.txt): choose a new "
                             "folder or delete it first")
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_an_existing_export_is_not_overwritten(tiny):
    before = {name: os.path.getmtime(f"{tiny.out}/{name}") for name in os.listdir(tiny.out)}
    result = export_cli(tiny.base, "--source", "sft", "--out", tiny.out)
    assert_one_error(result, f"--out {tiny.out} is not empty (it holds an export, e.g. README.md)")
    assert {name: os.path.getmtime(f"{tiny.out}/{name}") for name in os.listdir(tiny.out)} == before


def test_what_a_cut_short_export_left_is_replaced(tiny, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"half")  # an upload killed before config.json, the last file
    result = export_cli(tiny.base, "--source", "sft", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"removing an incomplete export from {out}: model.safetensors" in result.stdout
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_hidden_layers == 2


def test_a_checkpoint_of_another_architecture_is_one_error_naming_the_field(tmp_path):
    base = str(tmp_path)
    save_tokenizer(base, 300)
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    save_random_model(base, "sft", config, window_pattern="SSSL")  # say, nanochat's sliding windows
    result = export_cli(base, "--source", "sft", "--out", f"{base}/hf")
    assert_one_error(result, "checkpoint model_config field 'window_pattern' (= 'SSSL') is not one of this "
                             "vibechat's GPTConfig")
    assert sorted(os.listdir(base)) == ["checkpoints", "tokenizer"]


def test_a_model_setting_the_format_cannot_express_is_one_error_naming_the_field(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VIBECHAT_BASE_DIR", tiny.base)
    monkeypatch.delitem(jobs.export.CONFIG_FIELDS, "n_kv_head")  # as if NanoChat had no grouped-query attention
    with pytest.raises(VibechatError, match="sft model d2 step 0: model_config field 'n_kv_head' \\(= 2\\) has no "
                                            "counterpart in the transformers NanoChat format"):
        export("sft", None, None, str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


def test_a_failure_while_writing_leaves_nothing_at_out(tiny, tmp_path, monkeypatch):
    def broken(tokenizer):
        raise VibechatError("disk full")

    monkeypatch.setenv("VIBECHAT_BASE_DIR", tiny.base)
    monkeypatch.setattr(jobs.export, "tokenizer_json", broken)  # after model.safetensors is written
    with pytest.raises(VibechatError, match="disk full"):
        export("sft", None, None, str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []  # neither --out nor the temporary folder beside it


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("tie_word_embeddings", True),
                                          ("intermediate_size", 100), ("rms_norm_eps", 1e-5)])
def test_importing_a_config_vibechat_cannot_express_names_the_field(tiny, tmp_path, field, value):
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in os.listdir(tiny.out):
        (folder / name).write_bytes(open(f"{tiny.out}/{name}", "rb").read())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    result = export_cli(str(tmp_path / "run"), "--import", str(folder), "--source", "sft")
    assert_one_error(result, f"{folder}/config.json: {field} = {value!r} cannot be expressed by vibechat's GPT")
    assert not os.path.exists(tmp_path / "run")


def test_importing_a_folder_without_weights_names_the_missing_file(tiny, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_bytes(open(f"{tiny.out}/config.json", "rb").read())
    result = export_cli(str(tmp_path / "run"), "--import", str(folder), "--source", "sft")
    assert_one_error(result, f"{folder}/model.safetensors is missing: --import takes a folder written by "
                             "python -m jobs.export")


def test_importing_a_file_instead_of_a_folder_is_one_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    result = export_cli(str(tmp_path / "run"), "--import", str(tmp_path / "model.safetensors"), "--source", "sft")
    assert_one_error(result, f"--import {tmp_path}/model.safetensors is a file: give the folder python -m jobs.export "
                             "wrote")
    assert not os.path.exists(tmp_path / "run")


def test_importing_into_a_run_with_another_tokenizer_is_refused(tiny, tmp_path):
    base = str(tmp_path)
    save_tokenizer(base, 300)
    result = export_cli(base, "--import", tiny.out, "--source", "sft")
    assert_one_error(result, f"{tiny.out}'s tokenizer differs from the run's ({base}/tokenizer)")
    assert sorted(os.listdir(base)) == ["tokenizer"]


def test_export_under_several_ranks_is_refused(tiny, tmp_path):
    result = run_phase("jobs.export", ["--source", "sft", "--out", str(tmp_path / "hf")],
                       {"VIBECHAT_BASE_DIR": tiny.base, "WORLD_SIZE": "2"})
    assert_one_error(result, "export runs as one process: give its phase nproc_per_node 1 and nnodes 1")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--import", "x"], "--import needs --source"),
    (["--import", "x", "--out", "y", "--source", "sft"], "--import and --out do not go together"),
    (["--source", "sft", "--step", "-1"], "argument --step: -1 must be at least 0"),
])
def test_bad_arguments_are_one_usage_error(tmp_path, argv, message):
    result = export_cli(str(tmp_path), *argv)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# --- lm-evaluation-harness ---------------------------------------------------------------------------------


def test_lm_eval_scores_the_local_task_as_chat_eval_scores_it(ci, tmp_path):
    problems = 40
    env = {"VIBECHAT_BASE_DIR": ci.base}
    result = run_phase("jobs.chat_eval", ["--source=base", "-a", "multiple-choice-standin",
                                          f"--max-problems={problems}"], env)
    assert result.returncode == 0, result.stderr
    records, _ = read_metrics(open_store(ci.base), "metrics/base_eval.jsonl")
    ours = next(r["score"] for r in records if r["task"] == "MultipleChoice (stand-in)")
    lm_eval = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={ci.out},dtype=float32",
               "--tasks", "vibechat_multiple_choice_standin", "--include_path", f"{REPO}/tasks/lm_eval",
               "--apply_chat_template", "--device", "cpu", "--limit", str(problems), "--batch_size", "8",
               "--output_path", str(tmp_path)]
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    result = subprocess.run(lm_eval, env={**phase_env({}), **offline}, cwd=str(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files if f.startswith("results")]
    theirs = json.load(open(results_file))["results"]["vibechat_multiple_choice_standin"]["acc,none"]
    assert abs(theirs - ours) <= 0.01
