"""The view's state: widget values that survive a visit to another page, and the part a URL carries
(?run=...&phase=...&compare=...&x=...), so a view can be shared or reloaded.

A page sets each kept widget's value with init() before drawing it and draws it with its key alone (no
value or index: Streamlit warns when both set it); app.py calls keep() first on every run.
"""

from collections.abc import Sequence

import streamlit as st

# widgets whose values a visit to another page must not reset (Streamlit forgets a widget not drawn in a run)
KEPT = ("run_id", "compare_with", "metrics_phase", "metrics_x", "smoothing", "log_y", "chat_source", "chat_model_tag",
        "chat_server_model", "chat_step", "chat_temperature", "chat_top_k", "logs_phase", "logs_attempt")


def keep() -> None:
    """Turn the kept widgets' values into plain session state, which outlives their widgets."""
    for key in KEPT:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def init(key: str, default, options: Sequence | None = None, param: str | None = None) -> None:
    """The widget's value before it is drawn: the URL's `param` when the session first meets the widget, else
    the value kept, else `default`; a value that is not among `options` (a run deleted since, a mistyped URL)
    gives way to default, with a warning when the URL named it. A list default makes a multiselect: its URL form is
    the parameter repeated."""
    multi = isinstance(default, list)
    from_url = key not in st.session_state and param and param in st.query_params
    if from_url:
        st.session_state[key] = st.query_params.get_all(param) if multi else st.query_params[param]
    value = st.session_state.get(key, default)
    if options is not None:
        unknown = [v for v in value if v not in options] if multi else ([] if value in options else [value])
        if unknown and from_url:
            st.warning(f"The URL asks for {param}={', '.join(map(str, unknown))}, which is not in this store: "
                       f"it shows {', '.join(map(str, default)) if multi else default} instead.")
        value = [v for v in value if v in options] if multi else (value if value in options else default)
    st.session_state[key] = value


def share(**params) -> None:
    """Write the view into the URL: a list repeats its parameter, None or [] leaves it out."""
    for name, value in params.items():
        if value is None or value == []:
            st.query_params.pop(name, None)
        else:
            st.query_params[name] = [str(v) for v in value] if isinstance(value, list) else str(value)
