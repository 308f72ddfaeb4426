"""Tasks: readers of the public datasets on rows in their exact parquet schemas, the offline stand-ins,
mixtures, grading, custom conversation files and the registry."""

import collections
import functools
import http.server
import io
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.arc import ARC
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, extract_answer
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.registry import TASKS, get_task
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tasks.standins import (StandinArithmetic, StandinConversations, StandinMultipleChoice,
                            StandinMultipleChoiceGenerative)
from vibechat.common import VibechatError
from vibechat.storage import open_store
from vibechat.tokenizer import chat_messages

# the column types of the datasets on the hub
ARC_SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()),
    ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
    ("answerKey", pa.string()),
])
MMLU_SCHEMA = pa.schema([
    ("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.int64()),
])
MMLU_AUX_SCHEMA = pa.schema([("train", pa.struct([
    ("answer", pa.int64()), ("choices", pa.list_(pa.string())), ("question", pa.string()), ("subject", pa.string()),
]))])
GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])
SMOLTALK_SCHEMA = pa.schema([
    ("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))), ("source", pa.string()),
])

ARC_ROWS = [
    {"id": "Mercury_7175875", "question": "Which gas do plants take in from the air?",
     "choices": {"text": ["oxygen", "carbon dioxide", "nitrogen", "helium"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "NYSEDREGENTS_2015_4_9", "question": "Which object is a conductor of electricity?",
     "choices": {"text": ["a wooden spoon", "a rubber band", "a copper wire"], "label": ["1", "2", "3"]},
     "answerKey": "3"},
]
GSM8K_ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


def parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def store(store_url, monkeypatch):
    """The store the task readers use, empty."""
    monkeypatch.setenv("VIBECHAT_STORE", store_url)
    return open_store(store_url)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local HTTP server laid out like the hub (datasets/<repo>/resolve/main/<path>); returns its root folder."""
    root = tmp_path / "hub"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield root
    server.shutdown()
    server.server_close()


# --- readers of the public datasets ----------------------------------------------------------


def test_arc_reads_rows_of_the_hub_schema_and_letters_numeric_labels(store):
    store.put_bytes("data/tasks/arc/ARC-Easy/test-00000-of-00001.parquet", parquet_bytes(ARC_ROWS, ARC_SCHEMA))
    task = ARC("ARC-Easy", "test")
    assert task.name == "ARC-Easy" and task.eval_type == "multiple_choice" and len(task) == 2
    by_id = {c["id"]: c for c in (task[i] for i in range(len(task)))}
    plants = by_id["Mercury_7175875"]
    assert plants["letters"] == ["A", "B", "C", "D"] and plants["answer"] == "B"
    assert "Which gas do plants take in from the air?" in plants["messages"][0]["content"]
    assert "B. carbon dioxide" in plants["messages"][0]["content"]
    assert plants["messages"][1] == {"role": "assistant", "content": "B"}
    wire = by_id["NYSEDREGENTS_2015_4_9"]
    assert wire["letters"] == ["A", "B", "C"] and wire["answer"] == "C"
    assert "C. a copper wire" in wire["messages"][0]["content"]
    assert task.evaluate(wire, " C ") == 1 and task.evaluate(wire, "A") == 0


def test_mmlu_reads_rows_of_the_hub_schema(store):
    rows = [{"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"],
             "answer": 1}]
    store.put_bytes("data/tasks/mmlu/all/test-00000-of-00001.parquet", parquet_bytes(rows, MMLU_SCHEMA))
    (conversation,) = MMLU("all", "test")
    assert conversation["answer"] == "B" and conversation["subject"] == "elementary_mathematics"
    assert "B. 4" in conversation["messages"][0]["content"]


def test_mmlu_auxiliary_train_unwraps_its_train_struct(store):
    rows = [{"train": {"answer": 3, "choices": ["red", "blue", "green", "black"], "question": "Coal is usually what color?",
                       "subject": ""}}]
    store.put_bytes("data/tasks/mmlu/auxiliary_train/train-00000-of-00001.parquet", parquet_bytes(rows, MMLU_AUX_SCHEMA))
    (conversation,) = get_task("mmlu-auxiliary-train")
    assert conversation["answer"] == "D" and "D. black" in conversation["messages"][0]["content"]


def test_gsm8k_turns_calculations_into_python_tool_calls(store):
    store.put_bytes("data/tasks/gsm8k/main/test-00000-of-00001.parquet", parquet_bytes([GSM8K_ROW], GSM8K_SCHEMA))
    (conversation,) = GSM8K("main", "test")
    assert conversation["messages"][0] == {"role": "user", "content": GSM8K_ROW["question"]}
    assert conversation["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    assert conversation["answer"] == "72"


@pytest.mark.parametrize("response, reference, correct", [
    ("so the answer is\n#### 72", "72", 1),
    ("#### 1,234", "1234", 1),
    ("#### -5", "-5", 1),
    ("#### 5", "-5", 0),
    ("#### 3.50", "3.5", 1),
    ("#### 0.25", "0.5", 0),
    ("#### $18.", "18", 1),
    ("first guess #### 7, no wait: #### 8", "8", 1),
    ("The answer is 72.", "72", 0),
    ("", "72", 0),
])
def test_gsm8k_grades_the_number_after_the_last_marks(response, reference, correct):
    task = StandinArithmetic("test", size=1)  # graded exactly like GSM8K, without a dataset file
    conversation = {"messages": [], "answer": reference}
    assert task.evaluate(conversation, response) == correct
    assert task.reward(conversation, response) == float(correct)


def test_extract_answer_strips_thousands_separators():
    assert extract_answer("#### 1,000,000") == "1000000" and extract_answer("no marks") is None


def test_smoltalk_reads_rows_of_the_hub_schema(store):
    rows = [{"messages": [{"content": "Be brief.", "role": "system"}, {"content": "Hi", "role": "user"},
                          {"content": "Hello!", "role": "assistant"}], "source": "everyday-conversations"}]
    store.put_bytes("data/tasks/smoltalk/data/test-00000-of-00001.parquet", parquet_bytes(rows, SMOLTALK_SCHEMA))
    (conversation,) = SmolTalk("test")
    assert conversation == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello!"}]}


def test_smoltalk_train_reads_all_four_files(store):
    for i in range(4):
        messages = [{"content": f"q{i}", "role": "user"}, {"content": f"a{i}", "role": "assistant"}]
        rows = [{"messages": messages, "source": "x"}]
        store.put_bytes(f"data/tasks/smoltalk/data/train-{i:05d}-of-00004.parquet", parquet_bytes(rows, SMOLTALK_SCHEMA))
    task = SmolTalk("train")
    assert [task[i]["messages"][0]["content"] for i in range(len(task))] == ["q0", "q1", "q2", "q3"]


def test_readers_work_on_an_s3_store(s3_url, monkeypatch):
    monkeypatch.setenv("VIBECHAT_STORE", s3_url)
    key = "data/tasks/gsm8k/main/train-00000-of-00001.parquet"
    open_store(s3_url).put_bytes(key, parquet_bytes([GSM8K_ROW], GSM8K_SCHEMA))
    assert GSM8K("main", "train")[0]["answer"] == "72"


# --- downloads ---------------------------------------------------------------------------------


def test_dataset_downloads_into_the_store_once(store, hub):
    path = hub / "datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    path.write_bytes(parquet_bytes([GSM8K_ROW], GSM8K_SCHEMA))
    assert GSM8K("main", "test")[0]["answer"] == "72"
    assert store.exists("data/tasks/gsm8k/main/test-00000-of-00001.parquet")
    path.unlink()  # from now on only the store has it
    assert len(GSM8K("main", "test")) == 1


def test_offline_download_error_names_the_url_and_the_standin(store, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(VibechatError, match=r"(?s)openai/gsm8k.*offline.*'arithmetic-standin'"):
        GSM8K("main", "test")
    assert store.list() == []


def test_missing_file_on_the_hub_is_reported_with_its_status(store, hub):
    with pytest.raises(VibechatError, match="HTTP 404"):
        ARC("ARC-Challenge", "validation")


def test_a_corrupt_file_in_the_store_is_named(store):
    store.put_bytes("data/tasks/gsm8k/main/test-00000-of-00001.parquet", b"<html>rate limited</html>")
    with pytest.raises(VibechatError, match=r"gsm8k/main/test-00000-of-00001.parquet is not a readable parquet file"):
        GSM8K("main", "test")


def test_a_file_with_other_columns_is_named(store):
    schema = pa.schema([("question", pa.string()), ("solution", pa.string())])
    rows = [{"question": "q", "solution": "s"}]
    store.put_bytes("data/tasks/gsm8k/main/test-00000-of-00001.parquet", parquet_bytes(rows, schema))
    with pytest.raises(VibechatError, match=r"lacks the column\(s\) \['answer'\]"):
        GSM8K("main", "test")


def test_unknown_split_is_refused():
    with pytest.raises(VibechatError, match="ARC split must be one of 'train', 'validation', 'test', got 'dev'"):
        ARC("ARC-Easy", "dev")


# --- Task, mixtures, sequences -----------------------------------------------------------------


def questions(task) -> list[str]:
    return [task[i]["messages"][0]["content"] for i in range(len(task))]


def test_task_slices_with_start_stop_step():
    full = questions(StandinArithmetic("train", size=10))
    sliced = StandinArithmetic("train", size=10, start=1, stop=8, step=3)
    assert len(sliced) == 3 and questions(sliced) == full[1:8:3]
    assert sliced[-1] == StandinArithmetic("train", size=10)[7]
    with pytest.raises(IndexError):
        sliced[3]


def test_mixture_is_the_same_for_the_same_seed_and_differs_for_another():
    a, b = StandinArithmetic("train", size=20), StandinMultipleChoice("train", size=5)
    first = questions(TaskMixture([a, b], seed=1))
    assert first == questions(TaskMixture([a, b], seed=1))
    assert first != questions(TaskMixture([a, b], seed=2))
    assert sorted(first) == sorted(questions(a) + questions(b))


def test_mixture_oversamples_a_task_listed_twice():
    a, b = StandinArithmetic("train", size=20), StandinMultipleChoice("train", size=5)
    mixture = TaskMixture([a, b, b], seed=0)
    counts = collections.Counter(mixture[i]["messages"][0]["content"] for i in range(len(mixture)))
    assert len(mixture) == 30
    assert all(counts[q] == 2 for q in questions(b)) and all(counts[q] == 1 for q in questions(a))
    assert mixture.name == "Mixture(Arithmetic (stand-in), MultipleChoice (stand-in), MultipleChoice (stand-in))"


# --- stand-ins and synthetic tasks -------------------------------------------------------------


STANDINS = [StandinArithmetic, StandinMultipleChoice, StandinConversations]


@pytest.mark.parametrize("cls", STANDINS)
def test_standins_are_named_as_standins_and_deterministic(cls):
    task = cls("train", size=50)
    assert task.name.endswith("(stand-in)")
    assert [task[i] for i in range(50)] == [cls("train", size=50)[i] for i in range(50)]


@pytest.mark.parametrize("cls", STANDINS)
def test_standin_train_and_test_share_no_question(cls):
    def keys(task):
        return {json.dumps(task[i]["messages"]) for i in range(len(task))}
    assert not keys(cls("train", size=400)) & keys(cls("test", size=200))


def test_standin_arithmetic_is_in_gsm8k_format_and_its_reference_solution_is_correct():
    task = StandinArithmetic("test", size=200)
    for conversation in task:
        parts = conversation["messages"][1]["content"]
        assert {p["type"] for p in parts} >= {"text", "python", "python_output"}
        for call, output in zip(parts, parts[1:]):
            if call["type"] == "python":
                assert output["type"] == "python_output"
                assert float(eval(call["text"])) == float(output["text"])  # the calculator agrees
        reply = "".join(p["text"] for p in parts)
        assert reply.rstrip().split("\n")[-1].startswith("####")
        assert task.evaluate(conversation, reply) == 1
    answers = {c["answer"] for c in task}
    assert any(a.startswith("-") for a in answers) and any("." in a for a in answers)


def test_standin_multiple_choice_is_in_arc_format_with_consistent_answers():
    task = StandinMultipleChoice("train", size=300)
    for conversation in task:
        assert conversation["letters"] == ["A", "B", "C", "D"]
        assert conversation["messages"][1]["content"] == conversation["answer"]
        assert task.evaluate(conversation, conversation["answer"]) == 1
    # the right answer is spread over the letters
    assert set(collections.Counter(c["answer"] for c in task)) == {"A", "B", "C", "D"}


@pytest.mark.parametrize("reply, graded", [
    ("B", 1), (" B\n", 1), ("B.", 1), ("(B) 42", 1), ("B: because", 1),
    ("A", 0), ("Bob", 0), ("The answer is B", 0), ("", 0), ("b", 0)])
def test_the_generative_multiple_choice_standin_grades_the_replys_first_word(reply, graded):
    task = StandinMultipleChoiceGenerative("test")
    conversation = next(c for c in task if c["answer"] == "B")
    assert task.eval_type == "generative" and task.evaluate(conversation, reply) == graded


def test_the_generative_multiple_choice_standin_asks_the_same_questions():
    assert [c["messages"] for c in StandinMultipleChoiceGenerative("test", size=10)] == \
        [c["messages"] for c in StandinMultipleChoice("test", size=10)]


def test_spellingbee_counts_with_the_calculator_tool():
    task = SpellingBee(size=100, split="train")
    for conversation in task:
        parts = conversation["messages"][1]["content"]
        (call,) = [p for p in parts if p["type"] == "python"]
        (output,) = [p for p in parts if p["type"] == "python_output"]
        assert call["text"].endswith(")") and ".count('" in call["text"]
        assert str(eval(call["text"])) == output["text"] == conversation["answer"]
        assert task.evaluate(conversation, "".join(p["text"] for p in parts)) == 1
    assert {c["answer"] for c in task} >= {"0", "1", "2"}


def test_spellingbee_test_split_differs_from_train():
    assert SpellingBee(10, "train")[0] != SpellingBee(10, "test")[0]


def test_simplespelling_spells_the_word():
    conversation = SimpleSpelling(size=5)[0]
    word = conversation["answer"].split(":")[0]
    assert conversation["answer"] == word + ":" + ",".join(word)
    assert SimpleSpelling(size=5).evaluate(conversation, conversation["answer"]) == 1


# --- custom conversations ----------------------------------------------------------------------


def test_customjson_reads_objects_and_bare_message_lists(tmp_path):
    path = tmp_path / "chats.jsonl"
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    path.write_text(json.dumps({"messages": messages}) + "\n\n" + json.dumps(messages) + "\n")
    task = CustomJSON(str(path))
    assert len(task) == 2 and task[0] == task[1] == {"messages": messages}
    assert task.name == "CustomJSON(chats.jsonl)"


def test_customjson_malformed_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    path.write_text(good + "\n" + good + "\n" + '{"messages": [oops\n')
    with pytest.raises(VibechatError, match=r"chats.jsonl, line 3: not valid JSON"):
        CustomJSON(str(path))


def test_customjson_conversation_with_wrong_turns_names_the_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]) + "\n")
    with pytest.raises(VibechatError, match=r"chats.jsonl, line 1: message 1 has role 'user' where 'assistant'"):
        CustomJSON(str(path))


def test_customjson_missing_file_is_named(tmp_path):
    with pytest.raises(VibechatError, match="cannot read conversations file .*nope.jsonl"):
        CustomJSON(str(tmp_path / "nope.jsonl"))


def test_identity_conversations_ship_with_the_code():
    task = get_task("identity")
    assert len(task) >= 30 and task.name == "CustomJSON(identity.jsonl)"
    assert all("vibechat" in json.dumps(c).lower() for c in list(task)[:5])


# --- registry ----------------------------------------------------------------------------------


def test_unknown_task_name_lists_the_known_ones():
    with pytest.raises(VibechatError, match=r"unknown task 'gsm9k'; known tasks: arc-easy, .*arithmetic-standin"):
        get_task("gsm9k")


def test_unknown_task_argument_lists_the_accepted_ones():
    with pytest.raises(VibechatError, match=r"task 'arc-easy' takes no argument subset; it takes split, start, stop, step"):
        get_task("arc-easy", subset="ARC-Challenge", split="test")


def test_missing_task_argument_is_named():
    with pytest.raises(VibechatError, match=r"task 'customjson' needs the argument\(s\) filepath"):
        get_task("customjson")


def test_registry_builds_standins_by_name():
    task = get_task("arithmetic-standin", split="test", size=7, stop=5)
    assert isinstance(task, StandinArithmetic) and len(task) == 5 and task.split == "test"


# --- every task's conversations are well formed and render ------------------------------------


@pytest.fixture
def every_task(store, tmp_path) -> list:
    """One instance of every registered task, the dataset-backed ones on fixture files."""
    files = {
        "arc/ARC-Easy/test-00000-of-00001.parquet": parquet_bytes(ARC_ROWS, ARC_SCHEMA),
        "arc/ARC-Challenge/test-00000-of-00001.parquet": parquet_bytes(ARC_ROWS, ARC_SCHEMA),
        "mmlu/all/test-00000-of-00001.parquet": parquet_bytes(
            [{"question": "q?", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 0}], MMLU_SCHEMA),
        "mmlu/auxiliary_train/train-00000-of-00001.parquet": parquet_bytes(
            [{"train": {"answer": 0, "choices": ["a", "b", "c", "d"], "question": "q?", "subject": ""}}], MMLU_AUX_SCHEMA),
        "gsm8k/main/test-00000-of-00001.parquet": parquet_bytes([GSM8K_ROW], GSM8K_SCHEMA),
        "smoltalk/data/test-00000-of-00001.parquet": parquet_bytes(
            [{"messages": [{"content": "Hi", "role": "user"}, {"content": "Hello!", "role": "assistant"}], "source": "x"}],
            SMOLTALK_SCHEMA),
    }
    for key, data in files.items():
        store.put_bytes(f"data/tasks/{key}", data)
    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]) + "\n")
    arguments = {"mmlu-auxiliary-train": {}, "humaneval": {}, "identity": {}, "customjson": {"filepath": str(custom)},
                 "spellingbee": {"size": 5}, "simplespelling": {"size": 5}}
    tasks = [get_task(name, **arguments.get(name, {"split": "test"})) for name in TASKS]
    assert {type(t) for t in tasks} >= {ARC, MMLU, GSM8K, SmolTalk, HumanEval, SpellingBee, SimpleSpelling, CustomJSON}
    return tasks


def test_every_task_gives_well_formed_conversations(every_task):
    for task in every_task:
        for i in range(min(len(task), 20)):
            messages = chat_messages(task[i])
            assert messages[-1]["role"] == "assistant", task.name


def test_every_task_renders_with_the_tokenizer(every_task):
    from vibechat.tokenizer import RustBPETokenizer

    texts = [json.dumps(task[i]) for task in every_task for i in range(min(len(task), 3))]
    tokenizer = RustBPETokenizer.train_from_iterator(iter(texts * 3), vocab_size=300)
    for task in every_task:
        ids, mask = tokenizer.render_conversation(task[0])
        assert len(ids) == len(mask) > 0 and 0 < sum(mask) < len(mask), task.name
