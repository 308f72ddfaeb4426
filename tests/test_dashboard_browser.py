"""The dashboard in a real browser: `streamlit run dashboard/app.py` on loopback against a store holding two
small runs and two in progress, driven with Debian's chromium through Playwright (one server for the module).

Screenshots go to the test's tmp folder; with VIBECHAT_SCREENSHOT_DIR=docs/screenshots they also refresh
the committed ones:  VIBECHAT_SCREENSHOT_DIR=docs/screenshots .venv/bin/python -m pytest tests/test_dashboard_browser.py
"""

import os
import re
import shutil
import time
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import expect, sync_playwright

from dashboard.browser import launch, serve
from jobs import pipeline
from jobs.config import load_config
from jobs.runstore import read_run, write_run
from tests.dashboard_fixture import RL_ERROR, fill_store
from vibechat.storage import open_store

WAIT_MS = 30_000  # for a page to show what a test waits for: the first run of a page imports torch
NEW_RUN_MS = 10_000  # a run started elsewhere shows on an open Runs page within this
PAGES = {"runs": "Runs", "metrics": "Metrics", "logs": "Logs · tiny-demo", "artifacts": "Artifacts · tiny-demo",
         "report": "vibechat report", "chat": "Chat"}
expect.set_options(timeout=WAIT_MS)


def running_run(store: str, run_id: str, created: float) -> None:
    """A run whose data phase has been running for a minute."""
    run = pipeline.new_run(run_id, "tiny", load_config("tiny"), "local", created)
    pipeline.mark_running(run, "data", 1, f"vibechat-{run_id}-data-1", time.time() - 60)
    write_run(open_store(store), run, None)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Runs tiny-demo (the newest) and tiny-b, both over; tiny-live and tiny-stop, whose first phase runs."""
    store = str(tmp_path_factory.mktemp("dashboard") / "store")
    fill_store(store, "tiny-demo")
    fill_store(store, "tiny-b", seed=1)
    running_run(store, "tiny-live", time.time() - 7200)
    running_run(store, "tiny-stop", time.time() - 9000)
    return store


@pytest.fixture(scope="module")
def dashboard_url(store, tmp_path_factory):
    with serve(store, str(tmp_path_factory.mktemp("server") / "streamlit.log")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = launch(p)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


def settled(page) -> None:
    """Wait until the script run is over: the header's running icon is gone, and so is every element the last
    run left stale (the icon can be gone before a run starts; stale elements are kept until a run ends)."""
    expect(page.get_by_test_id("stStatusWidgetRunningIcon")).to_have_count(0)
    expect(page.locator("[data-stale='true']")).to_have_count(0)


def save_screenshot(page, tmp_path, name: str) -> None:
    """Once the script run is over, the window into tmp_path/name (and $VIBECHAT_SCREENSHOT_DIR)."""
    settled(page)
    path = tmp_path / name
    page.screenshot(path=str(path))
    if os.environ.get("VIBECHAT_SCREENSHOT_DIR"):
        os.makedirs(os.environ["VIBECHAT_SCREENSHOT_DIR"], exist_ok=True)
        shutil.copyfile(path, os.path.join(os.environ["VIBECHAT_SCREENSHOT_DIR"], name))


def choose(page, label: str, option: str) -> None:
    """Pick an option of a selectbox or multiselect and wait for the script run it starts."""
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")
    settled(page)


def say(page, text: str) -> None:
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill(text)
    box.press("Enter")


def greedy(page) -> None:
    """Temperature 0: the tiny model then says exactly what it learned."""
    page.get_by_role("slider", name="Temperature").press("Home")
    expect(page.get_by_role("slider", name="Temperature")).to_have_attribute("aria-valuetext", "0.00")


# --- runs -----------------------------------------------------------------------------------------------


def test_runs_page_lists_the_runs_and_the_error_of_the_failed_phase(page, dashboard_url, tmp_path):
    page.goto(dashboard_url)  # the Runs page is the default one
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    expect(page.get_by_text("tiny-demo · tiny · ❌ failed")).to_be_visible()
    expect(page.get_by_text("tiny-b · tiny · ❌ failed")).to_be_visible()
    expect(page.get_by_test_id("stDataFrame").first).to_contain_text("tiny-b")  # the table of runs
    expect(page.get_by_text(RL_ERROR).first).to_be_visible()  # the newest run's timeline is open
    save_screenshot(page, tmp_path, "runs.png")


def test_runs_page_follows_an_active_run_without_a_reload(page, dashboard_url, store):
    page.goto(dashboard_url)
    expect(page.get_by_text("tiny-live · tiny · ⏳ running")).to_be_visible()
    runs_table = page.get_by_test_id("stDataFrame").first
    expect(runs_table).to_contain_text("tiny-live")
    expect(runs_table).not_to_contain_text("tokenizer")
    # the controller moves the run on: data succeeded, the tokenizer phase started
    run, version = read_run(open_store(store), "tiny-live")
    pipeline.mark_succeeded(run, "data", time.time())
    pipeline.mark_running(run, "tokenizer", 1, "vibechat-tiny-live-tokenizer-1", time.time())
    write_run(open_store(store), run, version)
    expect(runs_table).to_contain_text("tokenizer")  # its current phase, redrawn by the page's refresh


def test_runs_page_on_an_empty_store_shows_a_run_started_after_it(page, dashboard_url, tmp_path):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    page.goto(dashboard_url)
    store_box = page.get_by_role("textbox", name="Store")
    store_box.fill(empty)
    store_box.press("Enter")
    expect(page.get_by_text(f"No runs yet in {empty}")).to_be_visible()
    settled(page)
    running_run(empty, "fresh", time.time())
    expect(page.get_by_text("fresh · tiny · ⏳ running")).to_be_visible(timeout=NEW_RUN_MS)


def test_stop_cancels_a_running_run_as_the_controller_command_does(page, dashboard_url, store):
    page.goto(f"{dashboard_url}/runs?run=tiny-stop")
    expander = page.get_by_test_id("stExpander").filter(has_text="tiny-stop · tiny")
    expander.get_by_role("button", name="Stop").click()
    expect(page.get_by_text("tiny-stop · tiny · ⛔ cancelled")).to_be_visible()
    assert pipeline.run_status(read_run(open_store(store), "tiny-stop")[0]) == pipeline.CANCELLED


# --- every page at its own URL, and the view in the URL -------------------------------------------------


@pytest.mark.parametrize("path", list(PAGES))
def test_every_page_opens_at_its_own_url(page, dashboard_url, path):
    page.goto(f"{dashboard_url}/{path}")
    expect(page.get_by_role("heading", name=PAGES[path]).first).to_be_visible()
    settled(page)
    expect(page.get_by_text("Page not found")).to_have_count(0)
    expect(page.get_by_test_id("stException")).to_have_count(0)


def test_a_shared_url_reproduces_the_view(page, browser, dashboard_url):
    page.goto(f"{dashboard_url}/metrics")
    choose(page, "Run", "tiny-b")
    expect(page).to_have_url(re.compile("run=tiny-b"))  # each choice in the URL before the next (a busy CI machine)
    choose(page, "Compare with", "tiny-demo")
    expect(page).to_have_url(re.compile("compare=tiny-demo"))
    page.get_by_role("radio", name="sft").click()
    expect(page).to_have_url(re.compile("phase=sft"))
    shared = page.url
    assert parse_qs(urlparse(shared).query) == {"run": ["tiny-b"], "compare": ["tiny-demo"], "phase": ["sft"],
                                                "x": ["step"]}
    other = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    other.goto(shared)
    expect(other.get_by_role("combobox", name="Run")).to_have_value("tiny-b")
    expect(other.get_by_test_id("stMultiSelect")).to_contain_text("tiny-demo")
    expect(other.get_by_role("radio", name="sft")).to_be_checked()
    expect(other.get_by_test_id("stVegaLiteChart")).to_have_count(2)  # sft's loss and lr
    other.context.close()


# --- metrics, logs, artifacts, report -------------------------------------------------------------------


def test_metrics_page_draws_every_metric_of_two_overlaid_runs(page, dashboard_url, tmp_path):
    page.set_viewport_size({"width": 1400, "height": 2000})  # tall enough for every chart, the scores and the diff
    page.goto(f"{dashboard_url}/metrics?compare=tiny-b")
    charts = page.get_by_test_id("stVegaLiteChart")
    expect(charts).to_have_count(6)
    for title in ["train loss", "validation bits per byte", "learning rate multiplier", "tokens per second", "MFU",
                  "peak GPU memory"]:
        expect(charts.filter(has_text=title).first).to_be_visible()
    expect(charts.first).to_contain_text("train loss (nats/token)")  # the y axis names its unit
    expect(charts.first).to_contain_text("tiny-b")  # the legend names both runs
    expect(page.get_by_role("heading", name="Evaluation")).to_be_visible()
    expect(page.get_by_role("heading", name="Config diff")).to_be_visible()
    save_screenshot(page, tmp_path, "metrics.png")


def test_logs_page_shows_each_attempt_of_a_phase(page, dashboard_url, tmp_path):
    page.goto(f"{dashboard_url}/logs?phase=rl")
    expect(page.get_by_test_id("stCode")).to_contain_text("rl attempt 2: step 10/10")
    expect(page.get_by_test_id("stCode")).to_contain_text("loss became nan at step 12")
    save_screenshot(page, tmp_path, "logs.png")
    choose(page, "Attempt", "1")
    expect(page.get_by_test_id("stCode")).to_contain_text("rl attempt 1: step 1/10")


def test_artifacts_page_lists_the_checkpoints_and_offers_the_metrics_and_report(page, dashboard_url, tmp_path):
    page.goto(f"{dashboard_url}/artifacts")
    table = page.get_by_test_id("stDataFrame")
    expect(table).to_contain_text("base")
    expect(table).to_contain_text("200")
    expect(page.get_by_role("button", name="base.csv")).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("button", name="sft.csv").click()
    assert open(download.value.path()).readline().startswith("time,phase,step,loss,lr")
    expect(page.get_by_role("button", name="report.md")).to_be_visible()
    save_screenshot(page, tmp_path, "artifacts.png")


def test_report_page_renders_the_report_with_its_summary_table(page, dashboard_url, tmp_path):
    page.goto(f"{dashboard_url}/report")
    expect(page.get_by_role("heading", name="vibechat report")).to_be_visible()
    expect(page.get_by_role("heading", name="Summary")).to_be_visible()
    expect(page.get_by_role("cell", name="ARC-Easy")).to_be_visible()
    expect(page.get_by_role("button", name="Download report.md")).to_be_visible()
    save_screenshot(page, tmp_path, "report.png")


# --- chat -----------------------------------------------------------------------------------------------


def test_chat_streams_the_models_reply_with_its_calculator_call(page, dashboard_url, tmp_path):
    page.goto(f"{dashboard_url}/chat")
    expect(page.get_by_text("sft model d1, step 60")).to_be_visible()
    greedy(page)
    say(page, "What is 12 times 7?")
    messages = page.get_by_test_id("stChatMessage")
    expect(messages).to_have_count(2)
    expect(messages.nth(1)).to_contain_text("Let me compute it: 🧮 12*7 → 84. The answer is 84.")
    expect(messages.nth(1)).not_to_contain_text("<|python_start|>")
    save_screenshot(page, tmp_path, "chat.png")


def test_a_calculator_reply_shows_the_expression_and_its_result_once_verbatim(page, dashboard_url):
    page.goto(f"{dashboard_url}/chat")
    greedy(page)
    say(page, "What is 7 times 7?")
    reply = page.get_by_test_id("stChatMessage").nth(1)
    expect(reply).to_contain_text("#### 49")  # the answer line, as text
    expect(reply).to_contain_text("So 7*7= 🧮 7*7 → 49 49 apples.")  # the model's * kept, the result set apart
    expect(reply.locator("code")).to_have_text(["7*7", "49"])
    expect(reply.locator("h1, h2, h3, h4, h5, h6, em")).to_have_count(0)


def test_chat_keeps_its_checkpoint_settings_and_conversation_across_pages(page, dashboard_url):
    page.goto(f"{dashboard_url}/chat")
    choose(page, "Checkpoint", "base")
    expect(page.get_by_text("base model d1, step 200")).to_be_visible()
    greedy(page)
    say(page, "The sky is")
    expect(page.get_by_test_id("stChatMessage")).to_have_count(2)
    settled(page)
    page.get_by_test_id("stSidebarNav").get_by_role("link", name="Metrics").click()
    expect(page.get_by_role("heading", name="Metrics")).to_be_visible()
    settled(page)
    page.get_by_test_id("stSidebarNav").get_by_role("link", name="Chat").click()
    expect(page.get_by_text("base model d1, step 200")).to_be_visible()
    expect(page.get_by_role("slider", name="Temperature")).to_have_attribute("aria-valuetext", "0.00")
    expect(page.get_by_test_id("stChatMessage")).to_have_count(2)
    expect(page.get_by_test_id("stChatMessage").first).to_contain_text("The sky is")
