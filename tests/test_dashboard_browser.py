"""The dashboard in a real browser: `streamlit run dashboard/app.py` on loopback against a store holding two
small runs and a third one in progress, driven with Debian's chromium through Playwright.

Screenshots go to the test's tmp folder; with VIBECHAT_SCREENSHOT_DIR=docs/screenshots they also refresh
the committed ones:  VIBECHAT_SCREENSHOT_DIR=docs/screenshots .venv/bin/python -m pytest tests/test_dashboard_browser.py
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from playwright.sync_api import expect, sync_playwright

from jobs import pipeline
from jobs.config import load_config
from jobs.runstore import read_run, write_run
from tests.conftest import free_port
from tests.dashboard_fixture import RL_ERROR, fill_store
from vibechat.storage import open_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
START_TIMEOUT = 60  # seconds for streamlit to answer its health check on a busy 2-core machine
WAIT_MS = 30_000  # for a page to show what a test waits for: the first run of a page imports torch
expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Runs tiny-demo (the newest) and tiny-b, both over, and tiny-live, whose first phase is running."""
    store = str(tmp_path_factory.mktemp("dashboard") / "store")
    fill_store(store, "tiny-demo")
    fill_store(store, "tiny-b", seed=1)
    now = time.time()
    run = pipeline.new_run("tiny-live", "tiny", load_config("tiny"), "local", now - 7200)
    pipeline.mark_running(run, "data", 1, "vibechat-tiny-live-data-1", now - 60)
    write_run(open_store(store), run, None)
    return store


@pytest.fixture(scope="module")
def dashboard_url(store, tmp_path_factory):
    """The URL of a dashboard serving the store."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {**os.environ, "VIBECHAT_STORE": store}
    with open(root / "streamlit.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, root / "streamlit.log")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_healthy(url: str, server: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with code {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"streamlit did not answer at {url} within {START_TIMEOUT}s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


def save_screenshot(page, tmp_path, name: str) -> None:
    """Once the script run is over (the header's running icon is gone), the window into tmp_path/name."""
    expect(page.get_by_test_id("stStatusWidgetRunningIcon")).to_have_count(0)
    path = tmp_path / name
    page.screenshot(path=str(path))
    if os.environ.get("VIBECHAT_SCREENSHOT_DIR"):
        os.makedirs(os.environ["VIBECHAT_SCREENSHOT_DIR"], exist_ok=True)
        shutil.copyfile(path, os.path.join(os.environ["VIBECHAT_SCREENSHOT_DIR"], name))


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


def test_metrics_page_draws_every_metric_of_two_overlaid_runs(page, dashboard_url, tmp_path):
    page.set_viewport_size({"width": 1400, "height": 1450})  # tall enough for every chart and the scores
    page.goto(f"{dashboard_url}/metrics")
    expect(page.get_by_text("train loss")).to_be_visible()
    page.get_by_role("combobox", name="Compare with").click()
    page.get_by_role("option", name="tiny-b").click()
    page.keyboard.press("Escape")
    charts = page.get_by_test_id("stVegaLiteChart")
    expect(charts).to_have_count(6)
    for title in ["validation bits per byte", "learning rate multiplier", "tokens per second", "MFU",
                  "peak GPU memory (GiB)"]:
        expect(page.get_by_text(title, exact=True)).to_be_visible()
    expect(page.get_by_role("heading", name="Evaluation")).to_be_visible()
    expect(page.get_by_test_id("stDataFrame")).to_contain_text("ARC-Easy")
    expect(page.get_by_test_id("stVegaLiteChart").first).to_contain_text("tiny-b")  # the legend names both runs
    save_screenshot(page, tmp_path, "metrics.png")


def test_report_page_renders_the_report_with_its_summary_table(page, dashboard_url, tmp_path):
    page.goto(f"{dashboard_url}/report")
    expect(page.get_by_role("heading", name="vibechat report")).to_be_visible()
    expect(page.get_by_role("heading", name="Summary")).to_be_visible()
    expect(page.get_by_role("cell", name="ARC-Easy")).to_be_visible()
    expect(page.get_by_role("button", name="Download report.md")).to_be_visible()
    save_screenshot(page, tmp_path, "report.png")


def test_chat_streams_the_models_reply_with_its_calculator_call(page, dashboard_url, tmp_path):
    page.goto(f"{dashboard_url}/chat")
    expect(page.get_by_text("sft model d1, step 60")).to_be_visible()
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill("What is 12 times 7?")
    box.press("Enter")
    messages = page.get_by_test_id("stChatMessage")
    expect(messages).to_have_count(2)
    expect(messages.nth(1)).to_contain_text("Let me compute it: 🧮 12*7 → 84. The answer is 84.")
    expect(messages.nth(1)).not_to_contain_text("<|python_start|>")
    save_screenshot(page, tmp_path, "chat.png")
