"""python -m jobs.chat_server on loopback, through the official openai client: replies, streams, n, concurrency,
limits, a disconnecting client, metrics."""

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest

from jobs.chat_server import MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_TOTAL_CHARS, assistant_parts, parse_request
from vibechat.engine import Engine
from tests.model_fixtures import CHAT_TEXTS, write_chat_checkpoint
from tests.serve_fixtures import REPO, free_port, start_server, stop_server

CONTEXT = 1024
MODEL = "default/sft/0"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A base dir holding a trained 300-token tokenizer and an sft checkpoint of a tiny random GPT; the GPT and the
    tokenizer."""
    base = tmp_path_factory.mktemp("run")
    return base, *write_chat_checkpoint(base, sequence_len=CONTEXT)


@pytest.fixture(scope="module")
def base_dir(checkpoint):
    return checkpoint[0]


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def server(base_dir, metrics_port):
    """The API's URL; /metrics alone is also on metrics_port."""
    proc, url = start_server(base_dir, "--metrics-port", str(metrics_port))
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def one_row_server(base_dir):
    """One decode row and room for one waiting sequence: a second long request must wait for the first."""
    proc, url = start_server(base_dir, "--max-batch", "1", "--max-waiting", "1")
    yield url
    stop_server(proc)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(url: str, text: str, **kwargs):
    return client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kwargs)


def metric(url: str, name: str) -> float:
    """A sample's value from url's /metrics, e.g. 'vibechat_serve_requests_total{outcome="length"}' (0 if absent)."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_reply_comes_back_with_its_finish_reason_and_usage(server):
    reply = ask(server, "hello there", max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and reply.model == MODEL
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_streamed_reply_is_the_same_text_as_the_unstreamed_one(server):
    whole = ask(server, "the sky is", max_tokens=16, temperature=0)
    chunks = list(ask(server, "the sky is", max_tokens=16, temperature=0, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_n_samples_give_n_choices_that_differ_and_a_seed_repeats_them(server):
    first = ask(server, "two plus", max_tokens=16, temperature=1.0, n=3, seed=5)
    again = ask(server, "two plus", max_tokens=16, temperature=1.0, n=3, seed=5)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [c.message.content for c in again.choices]


def test_16_concurrent_greedy_clients_get_exactly_what_each_gets_alone(server):
    prompts = [f"{CHAT_TEXTS[i % 4]} {i}" for i in range(16)]
    alone = [ask(server, p, max_tokens=24, temperature=0).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: ask(server, p, max_tokens=24, temperature=0).choices[0].message.content,
                                 prompts))
    assert together == alone


def test_models_lists_the_loaded_run_source_and_step(server):
    assert [m.id for m in client(server).models.list()] == [MODEL]


def test_health_and_ready_answer_once_warm(server):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    assert httpx.get(server + "/ready").json() == {"status": "ready", "model": MODEL}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("stop", [None, []])
def test_no_stop_sequences_is_accepted_as_openai_s_default(server, stop):
    assert ask(server, "hi", max_tokens=2, stop=stop).choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param, code", [
    ({"messages": user("hi"), "temperature": 2.5}, "temperature", "invalid_value"),
    ({"messages": user("hi"), "temperature": -0.1}, "temperature", "invalid_value"),
    ({"messages": user("hi"), "top_k": 0}, "top_k", "invalid_value"),
    ({"messages": user("hi"), "top_k": 201}, "top_k", "invalid_value"),
    ({"messages": user("hi"), "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"messages": user("hi"), "max_tokens": 4097}, "max_tokens", "invalid_value"),
    ({"messages": user("hi"), "max_completion_tokens": CONTEXT}, "max_completion_tokens", "context_length_exceeded"),
    ({"messages": user("hi"), "n": 0}, "n", "invalid_value"),
    ({"messages": user("hi"), "n": 9}, "n", "invalid_value"),
    ({"messages": user("hi"), "logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"messages": user("hi"), "stop": ["\n"]}, "stop", "unsupported_parameter"),
    ({"messages": user("hi"), "stop": "\n"}, "stop", "unsupported_parameter"),
    ({"messages": user("hi"), "stream": "yes"}, "stream", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": user("hi") * (MAX_MESSAGES + 1)}, "messages", "too_many_messages"),
    ({"messages": user("x" * (MAX_MESSAGE_CHARS + 1))}, "messages[0].content", "message_too_long"),
    ({"messages": [{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 2
      + user("z" * 7000)}, "messages", "messages_too_long"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0]", "invalid_value"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "invalid_value"),
    ({"messages": user("hi"), "model": "gpt-4"}, "model", "model_not_found"),
])
def test_each_limit_is_a_4xx_naming_it_and_the_server_keeps_serving(server, body, param, code):
    response = httpx.post(server + "/v1/chat/completions", json=body)
    assert 400 <= response.status_code < 500
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and error["message"]
    assert ask(server, "hi", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_the_total_character_limit_is_nanochats(server):
    assert MAX_TOTAL_CHARS == 32_000 and MAX_MESSAGE_CHARS == 8_000 and MAX_MESSAGES == 500


def test_a_prompt_longer_than_the_context_is_a_400(server):
    words = " ".join(["blue"] * 1500)
    response = httpx.post(server + "/v1/chat/completions", json={"messages": user(words)})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_malformed_body_is_a_400_and_the_server_keeps_serving(server, content):
    response = httpx.post(server + "/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"]
    assert ask(server, "hi", max_tokens=2).choices


def test_the_openai_client_raises_its_bad_request_error_with_the_message(server):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        ask(server, "hi", temperature=3)


def test_metrics_count_what_was_served(server):
    before = {name: metric(server, name) for name in (
        'vibechat_serve_requests_total{outcome="length"}', "vibechat_serve_generated_tokens_total",
        "vibechat_serve_time_to_first_token_seconds_count", 'vibechat_serve_requests_total{outcome="invalid"}')}
    ask(server, "hello", max_tokens=5, temperature=0, n=2)  # random weights: no stop token within 5
    httpx.post(server + "/v1/chat/completions", json={"messages": user("hi"), "top_k": 0})
    after = {name: metric(server, name) for name in before}
    assert after['vibechat_serve_requests_total{outcome="length"}'] - before[
        'vibechat_serve_requests_total{outcome="length"}'] == 2
    assert after["vibechat_serve_generated_tokens_total"] - before["vibechat_serve_generated_tokens_total"] == 10
    assert after["vibechat_serve_time_to_first_token_seconds_count"] - before[
        "vibechat_serve_time_to_first_token_seconds_count"] == 2
    assert after['vibechat_serve_requests_total{outcome="invalid"}'] - before[
        'vibechat_serve_requests_total{outcome="invalid"}'] == 1
    for gauge in ("vibechat_serve_running_requests", "vibechat_serve_waiting_requests",
                  "vibechat_serve_batch_occupancy"):
        assert metric(server, gauge) >= 0 and gauge in httpx.get(server + "/metrics").text


def test_the_metrics_port_answers_prometheus_text_with_the_request_counters(server, metrics_port):
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    before = metric(metrics_url, 'vibechat_serve_requests_total{outcome="length"}')
    ask(server, "hello", max_tokens=3, temperature=0)  # random weights: no stop token within 3
    response = httpx.get(metrics_url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE vibechat_serve_requests_total counter" in response.text
    assert metric(metrics_url, 'vibechat_serve_requests_total{outcome="length"}') - before == 1


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/ready")])
def test_the_metrics_port_serves_nothing_of_the_api(server, metrics_port, method, path):
    response = httpx.request(method, f"http://127.0.0.1:{metrics_port}{path}", json={"messages": user("hi")})
    assert response.status_code == 404 and "only /metrics" in response.text


def test_a_client_that_disconnects_mid_stream_frees_its_row_for_the_next_request(one_row_server):
    before = metric(one_row_server, "vibechat_serve_generated_tokens_total")
    stream = ask(one_row_server, "hello", max_tokens=1000, temperature=0, stream=True)
    next(iter(stream)), next(iter(stream))
    stream.close()
    # the one row is free long before the abandoned 1000 tokens would be: the next request gets it
    reply = ask(one_row_server, "hello", max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert metric(one_row_server, 'vibechat_serve_requests_total{outcome="cancelled"}') == 1
    assert metric(one_row_server, "vibechat_serve_generated_tokens_total") - before < 500


def test_a_full_queue_is_a_503_with_retry_after(one_row_server):
    stream = ask(one_row_server, "hello", max_tokens=1000, temperature=0, stream=True)
    next(iter(stream))
    response = httpx.post(one_row_server + "/v1/chat/completions", json={"messages": user("hi"), "n": 2})
    stream.close()
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "overloaded"


CALL = "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>"
CALL_PARTS = [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"}]


def test_a_calculator_call_sent_back_gets_the_prompt_ids_and_reply_of_the_engine_s_conversation(server, checkpoint):
    _, model, tokenizer = checkpoint
    written = [{"role": "user", "content": "two plus three"},
               {"role": "assistant", "content": f"two plus three is {CALL} five"},
               {"role": "user", "content": "and again?"}]
    reply = client(server).chat.completions.create(model=MODEL, messages=written, max_tokens=8, temperature=0)
    engine_messages = [written[0], {"role": "assistant", "content": [{"type": "text", "text": "two plus three is "},
                                                                      *CALL_PARTS, {"type": "text", "text": " five"}]},
                       written[2], {"role": "assistant", "content": ""}]
    ids = tokenizer.render_for_completion({"messages": engine_messages})
    engine_reply = Engine(model, tokenizer).generate_batch(ids, max_tokens=8, temperature=0.0)[0][0][len(ids):]
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == tokenizer.decode(engine_reply)


@pytest.mark.parametrize("content, parts", [
    ("plain", [{"type": "text", "text": "plain"}]),
    (f"{CALL}!", [*CALL_PARTS, {"type": "text", "text": "!"}]),
    ("<|python_start|>1<|python_end|>", [{"type": "python", "text": "1"}]),  # the calculator had no answer
])
def test_an_assistant_message_s_calculator_calls_become_tokenizer_parts(content, parts):
    assert assistant_parts(content) == parts


@pytest.mark.parametrize("content", [
    "cut by max_tokens <|python_start|>2+",
    "an output without its call <|output_start|>5<|output_end|>",
    "<|python_start|>1<|python_start|>",
])
def test_markers_outside_a_well_formed_call_stay_plain_text(content):
    assert assistant_parts(content) == [{"type": "text", "text": content}]


def test_a_call_inside_an_unclosed_call_is_the_call_and_the_outer_marker_plain_text():
    assert assistant_parts(f"<|python_start|>a{CALL}") == [{"type": "text", "text": "<|python_start|>a"}, *CALL_PARTS]


def test_markers_in_a_user_message_are_plain_text(checkpoint):
    tokenizer = checkpoint[2]
    tokens = parse_request({"messages": user(CALL)}, tokenizer, CONTEXT).tokens
    assert tokens == tokenizer.render_for_completion({"messages": user(CALL) + [{"role": "assistant", "content": ""}]})


def serve_without_checkpoint(base, *args: str) -> subprocess.CompletedProcess:
    """python -m jobs.chat_server over an empty base dir: it exits, with the error of the first check that fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIBECHAT_")}
    env["VIBECHAT_BASE_DIR"] = str(base)
    return subprocess.run([sys.executable, "-m", "jobs.chat_server", "--device", "cpu", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    ([], "no 'sft' checkpoint in"),
    (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' does not resolve"),
    (["--port", "70000"], "--port 70000 is not a port"),
    (["--metrics-port", "70000"], "--metrics-port 70000 is not a port"),
    (["--port", "9000", "--metrics-port", "9000"], "--metrics-port 9000 is --port too"),
    (["--max-batch", "0"], "--max-batch: 0 must be at least 1"),
    (["--store", "/tmp"], "--store needs --run"),
])
def test_a_missing_checkpoint_or_a_bad_option_is_one_line_and_a_nonzero_exit(tmp_path, args, message):
    result = serve_without_checkpoint(tmp_path, *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use_is_one_line_and_a_nonzero_exit_before_loading_the_model(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_without_checkpoint(tmp_path, "--port", str(port))  # the bind is checked before the model
    assert result.returncode == 2 and f"--port {port} is in use" in result.stderr
    assert "ready" not in result.stdout and "Traceback" not in result.stderr


def test_a_metrics_port_in_use_is_one_line_and_a_nonzero_exit_before_loading_the_model(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_without_checkpoint(tmp_path, "--port", "0", "--metrics-port", str(port))
    assert result.returncode == 2 and f"--metrics-port {port} is in use" in result.stderr
    assert "ready" not in result.stdout and "Traceback" not in result.stderr
