"""CORE evaluation, with a character tokenizer and a bigram model whose predictions each test sets."""

import functools
import http.server
import io
import json
import threading
import zipfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.core_fixtures import CORE_YAML, MC_DATA, META_CSV
from vibechat.common import VibechatError
from vibechat.core_eval import (
    CoreTask, core_score, evaluate_core, evaluate_example, evaluate_task, fewshot_examples, load_eval_bundle,
    standin_core_tasks,
)
from vibechat.storage import open_store


class CharTokenizer:
    """One token per character (its code point); BOS is 0."""

    def get_bos_token_id(self) -> int:
        return 0

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([prepend] if prepend is not None else []) + [ord(c) for c in text]


class BigramModel(torch.nn.Module):
    """After character a it predicts follows[a] almost surely; after any other character it is uniform."""

    def __init__(self, follows: dict[str, str], sequence_len: int | None = None):
        super().__init__()
        table = torch.zeros(128, 128)
        for a, b in follows.items():
            table[ord(a), ord(b)] = 20.0
        self.register_buffer("table", table)
        if sequence_len is not None:
            self.config = type("Config", (), {"sequence_len": sequence_len})()
        self.lengths = []  # the length of every batch it saw

    def forward(self, idx):
        self.lengths.append(idx.shape[1])
        return self.table[idx]


MC_META = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " "}
MC_FOLLOWS = {" ": "a", "a": "a"}


def test_multiple_choice_picks_the_lowest_mean_continuation_loss():
    model, tokenizer = BigramModel(MC_FOLLOWS), CharTokenizer()
    assert [evaluate_example(i, model, tokenizer, MC_DATA, "cpu", MC_META) for i in range(4)] == [True, True, True, False]
    assert evaluate_task(model, tokenizer, MC_DATA, "cpu", MC_META) == 0.75


def test_centered_accuracy_is_zero_for_guessing_and_one_for_perfect():
    model, tokenizer = BigramModel(MC_FOLLOWS), CharTokenizer()
    tasks = [CoreTask("tiny_mc", MC_META, MC_DATA, random_baseline=0.5),
             CoreTask("tiny_mc_perfect", MC_META, MC_DATA[:3], random_baseline=0.5)]
    results = evaluate_core(model, tokenizer, "cpu", tasks)
    assert results["tiny_mc"] == {"accuracy": 0.75, "centered": 0.5}  # (0.75 - 0.5) / (1 - 0.5)
    assert results["tiny_mc_perfect"] == {"accuracy": 1.0, "centered": 1.0}
    assert core_score(results) == 0.75


def test_schema_picks_the_context_after_which_the_continuation_is_likeliest():
    meta = {"task_type": "schema", "num_fewshot": 0, "continuation_delimiter": " "}
    data = [
        {"context_options": ["the x", "the y"], "continuation": "!", "gold": 0},
        {"context_options": ["a y", "a x"], "continuation": "!", "gold": 1},
        {"context_options": ["x", "y"], "continuation": "!", "gold": 1},
    ]
    model = BigramModel({"x": " ", " ": "!"})
    assert [evaluate_example(i, model, CharTokenizer(), data, "cpu", meta) for i in range(3)] == [True, True, False]


def test_language_modeling_needs_an_exact_greedy_match():
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    data = [
        {"context": "abc", "continuation": "de"},
        {"context": "abc ", "continuation": "dx"},
        {"context": "zzc", "continuation": "d"},
    ]
    model = BigramModel({"c": " ", " ": "d", "d": "e"})
    assert [evaluate_example(i, model, CharTokenizer(), data, "cpu", meta) for i in range(3)] == [True, False, True]


def test_fewshot_examples_are_other_examples_and_the_same_each_time():
    data = [{"n": i} for i in range(10)]
    for idx in range(10):
        shots = fewshot_examples(data, idx, 4)
        assert len(shots) == 4 and data[idx] not in shots and len({s["n"] for s in shots}) == 4
        assert shots == fewshot_examples(data, idx, 4)
    assert fewshot_examples(data[:2], 0, 5) == [data[1]]


def test_shots_come_before_the_question():
    meta = {**MC_META, "num_fewshot": 2}
    model = BigramModel(MC_FOLLOWS)
    assert evaluate_example(0, model, CharTokenizer(), MC_DATA, "cpu", meta)
    assert model.lengths[-1] > len("Q1 aaa") + 1  # the prompt holds shots too


def test_long_prompts_are_cropped_to_the_model_context_from_the_left():
    meta = {**MC_META, "num_fewshot": 3}
    data = [{**item, "query": "long context " * 5 + item["query"]} for item in MC_DATA]
    model = BigramModel(MC_FOLLOWS, sequence_len=16)
    assert evaluate_task(model, CharTokenizer(), data, "cpu", meta) == 0.75
    assert max(model.lengths) == 16


def test_unknown_task_type_is_refused():
    with pytest.raises(VibechatError, match="unknown CORE task type 'ranking'"):
        evaluate_example(0, BigramModel({}), CharTokenizer(), MC_DATA, "cpu", {**MC_META, "task_type": "ranking"})


def distributed_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = BigramModel(MC_FOLLOWS)
    accuracy = evaluate_task(model, CharTokenizer(), MC_DATA, "cpu", MC_META)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"accuracy": accuracy, "forwards": len(model.lengths)}, f)
    dist.destroy_process_group()


def test_ranks_split_the_examples_and_agree_on_the_accuracy(tmp_path):
    mp.spawn(distributed_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results == [{"accuracy": 0.75, "forwards": 2}, {"accuracy": 0.75, "forwards": 2}]


# --- the eval bundle --------------------------------------------------------------------------


def bundle_zip(with_core_yaml: bool = True) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        if with_core_yaml:
            z.writestr("eval_bundle/core.yaml", CORE_YAML)
        z.writestr("eval_bundle/eval_meta_data.csv", META_CSV)
        z.writestr("eval_bundle/eval_data/world_knowledge/tiny_mc.jsonl", "\n".join(json.dumps(d) for d in MC_DATA))
        z.writestr("eval_bundle/eval_data/language_modeling/tiny_lm.jsonl",
                   json.dumps({"context": "abc", "continuation": "de"}) + "\n")
    return buffer.getvalue()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def web(tmp_path):
    """A local HTTP server over a folder; yields (folder, base URL)."""
    root = tmp_path / "web"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_eval_bundle_downloads_into_the_store_once_and_loads(store_url, web):
    root, base = web
    (root / "eval_bundle.zip").write_bytes(bundle_zip())
    store = open_store(store_url)
    tasks = load_eval_bundle(store, url=f"{base}/eval_bundle.zip")
    assert store.exists("data/eval_bundle/core.yaml")
    assert store.exists("data/eval_bundle/eval_data/world_knowledge/tiny_mc.jsonl")
    mc, lm = tasks
    assert (mc.label, mc.random_baseline, mc.data) == ("tiny_mc", 0.5, MC_DATA)
    assert mc.task_meta == {"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": " "}
    assert (lm.label, lm.random_baseline, lm.task_meta["continuation_delimiter"]) == ("tiny_lm", 0.0, " ")
    (root / "eval_bundle.zip").unlink()  # from now on only the store has it
    again = load_eval_bundle(store, url=f"{base}/eval_bundle.zip")
    results = evaluate_core(BigramModel({**MC_FOLLOWS, "c": " ", " ": "d", "d": "e"}), CharTokenizer(), "cpu", again)
    assert results == {"tiny_mc": {"accuracy": 0.75, "centered": 0.5}, "tiny_lm": {"accuracy": 1.0, "centered": 1.0}}


def test_offline_eval_bundle_error_points_to_the_standins(store_url):
    store = open_store(store_url)
    with pytest.raises(VibechatError, match=r"(?s)CORE eval bundle.*offline.*stand-in CORE tasks"):
        load_eval_bundle(store, url="http://127.0.0.1:9/eval_bundle.zip")
    assert store.list() == []


def test_a_zip_that_is_not_the_bundle_is_refused(store_url, web):
    root, base = web
    (root / "other.zip").write_bytes(bundle_zip(with_core_yaml=False))
    (root / "page.zip").write_text("<html>not found</html>")
    store = open_store(store_url)
    with pytest.raises(VibechatError, match="is not the CORE eval bundle"):
        load_eval_bundle(store, url=f"{base}/other.zip")
    with pytest.raises(VibechatError, match="did not give a zip file"):
        load_eval_bundle(store, url=f"{base}/page.zip")
    assert not store.exists("data/eval_bundle/core.yaml")


# --- offline stand-ins --------------------------------------------------------------------------


def test_standin_core_tasks_are_named_as_standins_and_deterministic():
    tasks = standin_core_tasks(num_examples=50)
    assert {t.task_meta["task_type"] for t in tasks} == {"multiple_choice", "schema", "language_modeling"}
    assert all(t.label.endswith("(stand-in)") and len(t.data) == 50 for t in tasks)
    assert [t.data for t in tasks] == [t.data for t in standin_core_tasks(num_examples=50)]
    for t in tasks:
        if t.task_meta["task_type"] != "language_modeling":
            options = "choices" if t.task_meta["task_type"] == "multiple_choice" else "context_options"
            golds = {d["gold"] for d in t.data}
            assert golds == set(range(len(t.data[0][options])))  # the right answer is not always in one place
            assert t.random_baseline == 1 / len(t.data[0][options])


def test_standin_core_tasks_evaluate_end_to_end():
    tasks = standin_core_tasks(num_examples=10)
    results = evaluate_core(BigramModel(MC_FOLLOWS, sequence_len=64), CharTokenizer(), "cpu", tasks, max_per_task=6)
    assert set(results) == {t.label for t in tasks}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results.values())
    assert -1.0 <= core_score(results) <= 1.0
