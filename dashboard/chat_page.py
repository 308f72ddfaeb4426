"""Chat: talk to any checkpoint of the run (a base model continues the text instead), or, with VIBECHAT_SERVE_URL set,
to the model of that chat server; replies stream token by token. The chosen model, the sampling settings and the
conversation outlive a visit to another page."""

import os

import streamlit as st

from dashboard import chat, data, view
from vibechat.common import VibechatError
from vibechat.layout import run_dir

MAX_TOKENS = 512  # the longest reply of the in-process model
MAX_CHARS = 4000  # the longest message: about 1,000 tokens, more than a small model's context holds anyway

url, run_id = st.session_state.store_url, st.session_state.run_id
serve_url = os.environ.get("VIBECHAT_SERVE_URL")  # a chat server (python -m jobs.chat_server) to talk through
st.title("Chat")
if serve_url:
    try:
        models = chat.server_models(serve_url)
    except VibechatError as e:
        st.error(str(e))
        st.stop()
    model_column, temperature_column, top_k_column = st.columns([3, 2, 2])
    view.init("chat_server_model", models[0], models)
    model = model_column.selectbox("Model", models, key="chat_server_model", help=f"served by {serve_url}")
    conversation_of, is_chat = (serve_url, model), True
    caption = f"{model}, served by {serve_url}"
else:
    found = data.checkpoints(url, run_id)
    if not found:
        st.info(f"Run {run_id} has no checkpoint yet: chat needs one from the base, mid, sft or rl phase.")
        st.stop()
    stage_column, tag_column, step_column, temperature_column, top_k_column = st.columns([1, 1, 1, 2, 2])
    view.init("chat_source", list(found)[-1], list(found))
    stage = stage_column.selectbox("Checkpoint", list(found), help="the phase that wrote it", key="chat_source")
    view.init("chat_model_tag", list(found[stage])[0], list(found[stage]))
    model_tag = tag_column.selectbox("Model", list(found[stage]), key="chat_model_tag")
    view.init("chat_step", found[stage][model_tag][0], found[stage][model_tag])
    step = step_column.selectbox("Step", found[stage][model_tag], key="chat_step")
view.init("chat_temperature", 0.6)
temperature = temperature_column.slider("Temperature", 0.0, 2.0, step=0.05, key="chat_temperature",
                                        help="0 always picks the likeliest token")
view.init("chat_top_k", 50)
top_k = top_k_column.slider("Top-k", 1, 200, key="chat_top_k", help="sample among the k likeliest tokens")

if not serve_url:
    try:
        chat_model = chat.load_chat_model(data.store(url).uri(run_dir(run_id)), stage, model_tag, step)
    except Exception as e:  # a broken checkpoint gets a message; the rest of the app goes on
        reason = e if isinstance(e, VibechatError) else f"{type(e).__name__}: {e}"
        st.error(f"Cannot load checkpoint {stage}/{model_tag} step {step} of run {run_id}: {reason}")
        st.stop()
    conversation_of, is_chat = (url, run_id, stage, model_tag, step), chat_model.is_chat
    caption = f"{stage} model {model_tag}, step {step}, on {chat_model.device}"
    if not is_chat:
        caption += " — a base model continues your text"
    if chat_model.engine.use_cuda_graph:
        caption += " — the first reply waits while the decode step compiles (about a minute)"

# a conversation belongs to one model; each model keeps its own, so no page visit or model switch loses one
new_conversation = st.button("New conversation")
conversations = st.session_state.setdefault("chat_conversations", {})
if new_conversation or conversation_of not in conversations:
    conversations[conversation_of] = {
        "messages": [],  # (role, Markdown) as shown
        "history": [],  # {"role", "content"} as the chat server reads them
        "tokens": None if serve_url else [chat_model.engine.tokenizer.get_bos_token_id()],
    }
conversation = conversations[conversation_of]
st.caption(caption)

for role, text in conversation["messages"]:
    st.chat_message(role).markdown(text)

# one key for both kinds: a new placeholder then redraws the box in place rather than adding a second one
prompt = st.chat_input("Message the model" if is_chat else "Text for the model to continue", max_chars=MAX_CHARS,
                       key="chat_prompt")
if prompt:
    shown_prompt = chat.verbatim(prompt)
    st.chat_message("user").markdown(shown_prompt)
    history = [*conversation["history"], {"role": "user", "content": prompt}]
    if serve_url:
        sent: list[str] = []
        pieces = chat.stream_from_server(serve_url, model, history, sent, temperature, top_k)
    else:
        tokens = chat.prompt_tokens(chat_model, conversation["tokens"], prompt)
        reply: list[int] = []
        pieces = chat.stream_reply(chat_model, tokens, reply, temperature, top_k, MAX_TOKENS)
    with st.chat_message("assistant"):
        try:
            text = st.write_stream(pieces)
            if not text:
                text = "*(the model ended its reply at once)*"
                st.markdown(text)
        except VibechatError as e:  # e.g. the conversation outgrew the model's context, or the server failed
            st.error(f"{e} — this message is not part of the conversation; shorten it or start a new conversation.")
            st.stop()
    conversation["messages"] += [("user", shown_prompt), ("assistant", text)]
    if serve_url:
        conversation["history"] = [*history, {"role": "assistant", "content": "".join(sent)}]
    else:
        assistant_end = chat_model.engine.tokenizer.encode_special("<|assistant_end|>")
        conversation["tokens"] = tokens + reply + [assistant_end]
