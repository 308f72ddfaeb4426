"""The dashboard, headless (streamlit's AppTest), on stores that dashboard_fixture fills with a small real run."""

import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import requests
from streamlit.testing.v1 import AppTest

from dashboard import chat, data
from jobs import pipeline
from jobs.backends.local import LocalBackend
from jobs.config import load_config
from jobs.driver import local_state_dir, phase_job
from jobs.runstore import write_run
from tests.conftest import free_port
from tests.dashboard_fixture import RL_ERROR, fill_store
from vibechat.checkpoint_manager import build_model, load_checkpoint
from vibechat.common import autodetect_device_type
from vibechat.engine import Engine
from vibechat.storage import open_store
from vibechat.tokenizer import RustBPETokenizer

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dashboard", "app.py")
TIMEOUT = 60  # seconds for one script run: the first one imports torch, a chat turn loads and runs the model


@pytest.fixture(autouse=True)
def keep_main_module():
    """AppTest installs the app as sys.modules['__main__']; later tests' spawned workers would re-run it."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A store holding run tiny-demo; tests that change it work on a copy (the store fixture)."""
    path = tmp_path_factory.mktemp("filled") / "store"
    fill_store(str(path))
    return path


@pytest.fixture
def store(filled, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(filled, path)
    return path


def open_app(store_url, monkeypatch, page: str | None = None) -> AppTest:
    """The app on store_url ($VIBECHAT_STORE), switched to `page` (a page script beside app.py) if given."""
    monkeypatch.setenv("VIBECHAT_STORE", str(store_url))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def chart_titles(at: AppTest) -> list[str]:
    return [json.loads(chart.proto.spec)["title"] for chart in at.get("vega_lite_chart")]


def chart_data(element) -> pd.DataFrame:
    """The rows a chart on the page draws (its dataset, as Arrow IPC)."""
    return pa.ipc.open_stream(io.BytesIO(element.proto.datasets[0].data.data)).read_all().to_pandas()


def say(at: AppTest, text: str, temperature: float = 0.0) -> str:
    """Send a chat message; the text of the reply."""
    at.slider[0].set_value(temperature)
    at.chat_input[0].set_value(text).run()
    assert not at.exception, at.exception
    assert [m.name for m in at.chat_message][-2:] == ["user", "assistant"]
    return at.chat_message[-1].markdown[0].value


def expected_reply(store_path, text: str) -> str:
    """The greedy reply of the fixture's sft checkpoint, generated here without the dashboard."""
    run = f"{store_path}/runs/tiny-demo"
    model_data, _, meta = load_checkpoint(f"{run}/checkpoints/sft/d1", 60, "cpu")
    tokenizer = RustBPETokenizer.from_directory(f"{run}/tokenizer")
    special = tokenizer.encode_special
    prompt = [tokenizer.get_bos_token_id(), special("<|user_start|>"), *tokenizer.encode(text),
              special("<|user_end|>"), special("<|assistant_start|>")]
    results, _ = Engine(build_model(model_data, meta, "cpu", "eval"), tokenizer).generate_batch(
        prompt, max_tokens=64, temperature=0.0)
    return tokenizer.decode(results[0][len(prompt):])


# --- runs -----------------------------------------------------------------------------------------------


def test_runs_page_lists_the_run_with_its_preset_and_state(filled, monkeypatch):
    at = open_app(filled, monkeypatch)
    runs = at.dataframe[0].value
    row = ["tiny-demo", "tiny", "❌ failed", "rl"]
    assert runs[["run", "preset", "status", "current phase"]].values.tolist() == [row]


def test_runs_page_shows_the_timeline_of_every_phase(filled, monkeypatch):
    at = open_app(filled, monkeypatch)
    timeline = at.dataframe[1].value
    assert timeline["phase"].tolist() == pipeline.PHASES
    states = dict(zip(timeline["phase"], timeline["state"]))
    assert states["sft"] == "✅ succeeded" and states["rl"] == "❌ failed" and states["report"] == "⏸️ pending"
    rl = timeline.set_index("phase").loc["rl"]
    assert rl["attempt"] == 2 and rl["duration"] == "0m40s" and rl["ended"] > rl["started"]
    assert len(at.get("vega_lite_chart")) == 1  # the bars of the phases that ran


def test_runs_page_shows_the_error_of_the_failed_phase(filled, monkeypatch):
    at = open_app(filled, monkeypatch)
    assert [e.value for e in at.error] == [f"**rl** failed on attempt 2: {RL_ERROR}"]


def test_a_url_naming_a_run_not_in_the_store_says_so_and_shows_the_newest(filled, monkeypatch):
    monkeypatch.setenv("VIBECHAT_STORE", str(filled))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["run"] = "gone"
    at.run()
    assert [w.value for w in at.warning] == [
        "The URL asks for run=gone, which is not in this store: it shows tiny-demo instead."]
    assert at.selectbox(key="run_id").value == "tiny-demo"


def test_a_running_phase_shows_its_duration_so_far():
    config = {"phases": {name: {"skip": False} for name in pipeline.PHASES}}
    run = pipeline.new_run("live", "tiny", config, "local", 1000.0)
    pipeline.mark_running(run, "data", 1, "vibechat-live-data-1", 1000.0)
    assert data.is_active(run)
    row = data.phase_table(run, now=1090.0).iloc[0]
    assert (row["state"], row["duration"], row["ended"]) == ("⏳ running", "1m30s", "")


def test_an_unreadable_run_json_is_a_warning_and_the_other_runs_still_show(store, monkeypatch):
    (store / "runs" / "broken").mkdir()
    (store / "runs" / "broken" / "run.json").write_text("{ not json")
    at = open_app(store, monkeypatch)
    assert len(at.warning) == 1 and at.warning[0].value.startswith("run broken:")
    assert at.dataframe[0].value["run"].tolist() == ["tiny-demo"]


# --- metrics --------------------------------------------------------------------------------------------


def test_metrics_page_charts_loss_bpb_lr_throughput_mfu_and_memory(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "metrics_page.py")
    assert chart_titles(at) == ["train loss", "validation bits per byte", "learning rate multiplier",
                                "tokens per second", "MFU", "peak GPU memory"]
    loss = chart_data(at.get("vega_lite_chart")[0])
    assert len(loss) == 200 and set(loss["run"]) == {"tiny-demo"}


def test_metrics_page_charts_against_tokens(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "metrics_page.py")
    at.button_group(key="metrics_x").set_value("tokens").run()
    val_bpb = chart_data(at.get("vega_lite_chart")[1])
    assert val_bpb["tokens"].tolist() == [50 * 4096, 100 * 4096, 150 * 4096, 200 * 4096]


def test_metrics_page_shows_another_phase(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "metrics_page.py")
    at.button_group(key="metrics_phase").set_value("sft").run()
    assert chart_titles(at) == ["train loss", "learning rate multiplier"]


def test_metrics_page_overlays_the_runs_to_compare(store, monkeypatch):
    fill_store(str(store), "tiny-b", seed=1)
    at = open_app(store, monkeypatch, "metrics_page.py")
    at.multiselect(key="compare_with").set_value(["tiny-b"]).run()
    loss = chart_data(at.get("vega_lite_chart")[0])
    assert loss.groupby("run").size().to_dict() == {"tiny-demo": 200, "tiny-b": 200}


def test_metrics_page_smooths_the_curves_as_tensorboard_does(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "metrics_page.py")
    raw = chart_data(at.get("vega_lite_chart")[0])["loss"]
    at.slider(key="smoothing").set_value(0.9).run()
    smoothed = chart_data(at.get("vega_lite_chart")[0])["loss"]
    assert smoothed.iloc[0] == pytest.approx(raw.iloc[0])  # debiased: the first point is not pulled towards 0
    assert smoothed.diff().abs().mean() < raw.diff().abs().mean() / 2


def test_metrics_page_draws_a_log_y_axis(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "metrics_page.py")
    at.toggle(key="log_y").set_value(True).run()
    spec = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    assert spec["encoding"]["y"]["scale"]["type"] == "log"


def test_metrics_page_shows_the_settings_where_compared_runs_differ(store, monkeypatch):
    fill_store(str(store), "tiny-b", seed=1)
    run_json = store / "runs" / "tiny-b" / "run.json"
    run_json.write_text(run_json.read_text().replace('"depth": 4', '"depth": 6'))
    at = open_app(store, monkeypatch, "metrics_page.py")
    at.multiselect(key="compare_with").set_value(["tiny-b"]).run()
    diff = at.dataframe[-1].value
    assert diff.to_dict("index") == {"phases.base.args.depth": {"tiny-demo": "4", "tiny-b": "6"}}


def test_metrics_page_shows_the_eval_scores_of_each_stage(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "metrics_page.py")
    scores = at.dataframe[0].value
    assert scores.loc[("tiny-demo", "CORE"), "base"] == "0.0610"
    assert scores.loc[("tiny-demo", "MMLU"), "sft"] == "0.2700"


def test_a_stage_that_did_not_score_a_task_shows_a_blank_cell_not_none(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "metrics_page.py")
    assert at.dataframe[0].value.loc[("tiny-demo", "CORE"), "sft"] == ""


def test_a_corrupt_metrics_line_is_skipped_and_counted(store, monkeypatch):
    metrics = store / "runs" / "tiny-demo" / "metrics" / "base.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:10]) + '{"step": 11, "loss": 3.\n' + "".join(lines[10:]))
    at = open_app(store, monkeypatch, "metrics_page.py")
    assert [w.value for w in at.warning] == ["Skipped 1 corrupt line in tiny-demo's metrics/base.jsonl."]
    assert len(chart_data(at.get("vega_lite_chart")[0])) == 200


def test_a_100k_row_metrics_file_is_drawn_with_at_most_max_points_points(store, monkeypatch):
    rows = [{"step": s, "loss": 3.0 + np.sin(s / 500), "tokens": s * 4096} for s in range(1, 100_001)]
    rows[54_321]["loss"] = 50.0  # a spike must survive the downsampling
    (store / "runs" / "tiny-demo" / "metrics" / "base.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    at = open_app(store, monkeypatch, "metrics_page.py")
    loss = chart_data(at.get("vega_lite_chart")[0])
    assert len(loss) <= data.MAX_POINTS and loss["loss"].max() == 50.0


def test_downsample_keeps_each_buckets_lowest_and_highest_point_in_order():
    steps = np.arange(100_000)
    frame = pd.DataFrame({"step": steps, "loss": np.cos(steps / 1000.0)})
    frame.loc[77_777, "loss"], frame.loc[12_345, "loss"] = 9.0, -9.0
    points = data.downsample(frame, "step", "loss", max_points=2000)
    assert 1000 <= len(points) <= 2000
    assert points["step"].is_monotonic_increasing
    assert {77_777, 12_345} <= set(points["step"])


def test_downsample_leaves_a_short_series_whole_and_drops_rows_without_the_metric():
    frame = pd.DataFrame({"step": [1, 2, 3, 4], "val_bpb": [None, 1.5, None, 1.2]})
    assert data.downsample(frame, "step", "val_bpb").values.tolist() == [[2, 1.5], [4, 1.2]]


# --- report ---------------------------------------------------------------------------------------------


def test_report_page_renders_the_report_with_its_summary_table(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "report_page.py")
    report = (filled / "runs" / "tiny-demo" / "report" / "report.md").read_text()
    assert at.markdown[0].value == report.strip()
    assert "## Summary" in report and "| MMLU | - | - | 0.2700 | - |" in report
    assert at.download_button[0].label == "Download report.md"


def test_report_page_without_a_report_shows_the_scores_so_far(store, monkeypatch):
    (store / "runs" / "tiny-demo" / "report" / "report.md").unlink()
    at = open_app(store, monkeypatch, "report_page.py")
    assert at.info[0].value.startswith("No report yet for run tiny-demo")
    assert "| CORE | 0.0610 | - | - | - |" in at.markdown[0].value


# --- logs -----------------------------------------------------------------------------------------------


def test_logs_page_shows_a_running_phases_output_from_its_backend(store, monkeypatch):
    run = pipeline.new_run("live", "tiny", load_config("tiny"), "local", time.time())
    pipeline.mark_running(run, "data", 1, "vibechat-live-data-1", time.time())
    write_run(open_store(str(store)), run, None)
    job_dir = LocalBackend(local_state_dir(open_store(str(store)))).job_dir(phase_job(run, open_store(str(store)),
                                                                                      "data", 1))
    os.makedirs(job_dir)
    with open(os.path.join(job_dir, "output.log"), "w") as f:
        f.write("downloading shard 1/4\n")
    at = open_app(store, monkeypatch, "logs_page.py")  # the newest run: live
    assert at.code[0].value == "downloading shard 1/4"
    assert "following, every 5 s" in at.caption[0].value


# --- chat -----------------------------------------------------------------------------------------------


def test_chat_streams_the_reply_of_the_real_model(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "chat_page.py")
    assert at.caption[0].value.startswith(f"sft model d1, step 60, on {autodetect_device_type()}")
    reply = say(at, "hello there")
    assert reply == chat.verbatim(expected_reply(filled, "hello there"))
    assert reply == "Hello! I am a tiny vibechat model. How are you today?"


def test_chat_shows_a_calculator_call_as_its_expression_and_result(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "chat_page.py")
    assert say(at, "What is 12 times 7?") == "Let me compute it: 🧮 `12*7` → `84`. The answer is 84."


def test_chat_keeps_the_conversation_and_a_new_one_starts_empty(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "chat_page.py")
    say(at, "hello there")
    say(at, "Why is the sky blue?", temperature=0.6)
    assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
    at.button[0].click().run()
    assert len(at.chat_message) == 0


def test_the_message_box_takes_at_most_max_chars(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "chat_page.py")
    assert at.chat_input[0].proto.max_chars == 4000  # a longer one is cut in the box, not echoed and then dropped


def test_a_base_checkpoint_continues_the_text(filled, monkeypatch):
    at = open_app(filled, monkeypatch, "chat_page.py")
    at.selectbox(key="chat_source").set_value("base").run()
    assert "a base model continues your text" in at.caption[0].value
    say(at, "The sky is")
    assert not at.error


def test_a_checkpoint_that_fails_to_load_shows_a_message_and_the_app_stays_up(store, monkeypatch):
    checkpoint = store / "runs" / "tiny-demo" / "checkpoints" / "sft" / "d1"
    (checkpoint / "model_000070.pt").write_bytes(b"not a checkpoint")
    shutil.copyfile(checkpoint / "meta_000060.json", checkpoint / "meta_000070.json")
    at = open_app(store, monkeypatch, "chat_page.py")
    assert len(at.error) == 1
    assert at.error[0].value.startswith("Cannot load checkpoint sft/d1 step 70 of run tiny-demo: ")
    assert "truncated or corrupt" in at.error[0].value
    at.selectbox(key="chat_step").set_value(60).run()  # the previous step loads
    assert not at.error and not at.exception
    assert say(at, "hello there").startswith("Hello!")


def test_stream_reply_yields_the_reply_piece_by_piece(filled):
    model = chat.load_chat_model(f"{filled}/runs/tiny-demo", "sft", "d1", 60)
    tokens = chat.prompt_tokens(model, [model.engine.tokenizer.get_bos_token_id()], "What is 12 times 7?")
    reply: list[int] = []
    pieces = list(chat.stream_reply(model, tokens, reply, temperature=0.0, top_k=50, max_tokens=64))
    assert len(pieces) > 5
    assert "".join(pieces) == chat.display_text(model.engine.tokenizer, reply)
    assert model.engine.tokenizer.encode_special("<|assistant_end|>") not in reply


def test_display_text_shows_a_refused_calculator_call_without_a_result(filled):
    tokenizer = RustBPETokenizer.from_directory(f"{filled}/runs/tiny-demo/tokenizer")
    special = tokenizer.encode_special
    tokens = [*tokenizer.encode("so "), special("<|python_start|>"), *tokenizer.encode("1/0"),
              special("<|python_end|>"), *tokenizer.encode(" hmm")]
    assert chat.display_text(tokenizer, tokens) == "so 🧮 `1/0` hmm"


# --- the store ------------------------------------------------------------------------------------------


def test_an_empty_store_says_how_to_start_a_run(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    at = open_app(tmp_path / "empty", monkeypatch)
    assert [i.value for i in at.info] == [
        f"No runs yet in {tmp_path / 'empty'} — start one with `python -m jobs.controller start --preset tiny`"]


def test_a_store_folder_that_does_not_exist_says_so(tmp_path, monkeypatch):
    at = open_app(tmp_path / "missing", monkeypatch)
    assert not at.info and len(at.warning) == 1
    assert at.warning[0].value.startswith(f"The store folder {tmp_path / 'missing'} does not exist")


def test_an_unreachable_store_is_one_message(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    at = open_app("s3://nowhere/vibechat", monkeypatch)
    assert len(at.error) == 1 and len(at.main.children) == 1
    assert at.error[0].value.startswith("Cannot read the store: cannot reach the S3 endpoint for s3://nowhere/")


def test_a_malformed_store_url_is_one_message(monkeypatch):
    at = open_app("file://host/data", monkeypatch)
    assert [e.value for e in at.error] == [
        "Cannot read the store: store URL 'file://host/data': file URLs need three slashes, e.g. file:///data/vibechat"]


def test_the_sidebar_store_url_replaces_the_environments(filled, tmp_path, monkeypatch):
    at = open_app(tmp_path / "empty", monkeypatch)
    at.text_input(key="store_url").set_value(str(filled)).run()
    assert not at.info and at.dataframe[0].value["run"].tolist() == ["tiny-demo"]


def test_a_run_in_an_s3_store_shows_and_chats(s3_url, monkeypatch):
    fill_store(s3_url)
    at = open_app(s3_url, monkeypatch)
    assert at.dataframe[0].value["run"].tolist() == ["tiny-demo"]
    at.switch_page("chat_page.py").run()
    assert say(at, "hello there") == chat.verbatim("Hello! I am a tiny vibechat model. How are you today?")


# --- chat through a chat server (VIBECHAT_SERVE_URL) ----------------------------------------------------


@pytest.fixture(scope="module")
def chat_server(filled):
    """`python -m jobs.chat_server` serving the sft checkpoint of tiny-demo on loopback; its URL once ready."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VIBECHAT_")}, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "jobs.chat_server", "--device", "cpu", "--port", str(port),
                               "--store", str(filled), "--run", "tiny-demo", "--source", "sft"],
                              cwd=os.path.dirname(os.path.dirname(APP)), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not ready(url):
        assert server.poll() is None and time.monotonic() < deadline, "the chat server did not become ready"
        time.sleep(0.3)
    yield url
    server.terminate()
    server.wait(10)


def ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_chat_streams_the_reply_of_the_configured_chat_server(filled, chat_server, monkeypatch):
    monkeypatch.setenv("VIBECHAT_SERVE_URL", chat_server)
    at = open_app(filled, monkeypatch, "chat_page.py")
    assert at.caption[0].value == f"tiny-demo/sft/60, served by {chat_server}"
    assert say(at, "What is 7 times 7?") == "So 7\\*7= 🧮 `7*7` → `49` 49 apples.  \n\\#\\#\\#\\# 49"


def test_a_conversation_through_the_chat_server_reads_as_the_in_process_one(filled, chat_server, monkeypatch):
    replies = {}
    for serve_url in (chat_server, ""):
        monkeypatch.setenv("VIBECHAT_SERVE_URL", serve_url)
        at = open_app(filled, monkeypatch, "chat_page.py")
        replies[serve_url] = [say(at, "hello there"), say(at, "Why is the sky blue?")]
    assert replies[chat_server] == replies[""]


def test_an_unreachable_chat_server_is_one_message(filled, monkeypatch):
    serve_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("VIBECHAT_SERVE_URL", serve_url)
    at = open_app(filled, monkeypatch, "chat_page.py")
    assert [e.value for e in at.error] == [
        f"cannot reach the chat server at {serve_url} (ConnectionError): check VIBECHAT_SERVE_URL and that "
        "`python -m jobs.chat_server` runs there"]
