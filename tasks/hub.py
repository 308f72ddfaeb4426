"""Public datasets from the Hugging Face hub: downloaded once into the store, then read from there with pyarrow.

A file <path> of dataset <repo> lives in the store at data/tasks/<name>/<path>, shared by all runs.
Set HF_ENDPOINT to use a mirror of the hub.
"""

import os

import pyarrow as pa
import pyarrow.parquet as pq

from vibechat.common import VibechatError, get_store_url
from vibechat.download import download_to_store
from vibechat.layout import task_file_key
from vibechat.storage import open_store


def hf_url(repo: str, path: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/datasets/{repo}/resolve/main/{path}"


def load_parquet(name: str, repo: str, paths: list[str], columns: list[str], standin: str) -> pa.Table:
    """The rows of the given parquet files of `repo`, downloading those the store does not have yet.

    `columns` are the ones the reader needs (checked, so a wrong file fails here and says so);
    `standin` names the registry task to use instead when there is no network.
    """
    store = open_store(get_store_url())
    tables = []
    for path in paths:
        key = task_file_key(name, path)
        if not store.exists(key):
            hint = f"copy the file to {store.uri(key)}, or use the offline stand-in task {standin!r}"
            download_to_store(hf_url(repo, path), store, key, f"{repo} {path}", hint)
        try:
            table = pq.read_table(pa.BufferReader(store.get_bytes(key)))
        except pa.ArrowInvalid as e:
            raise VibechatError(
                f"{store.uri(key)} is not a readable parquet file ({e}); delete it to download it again"
            ) from None
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise VibechatError(
                f"{store.uri(key)} lacks the column(s) {missing} of {repo} (it has {table.column_names}); "
                "delete it to download it again"
            )
        tables.append(table.select(columns))
    return pa.concat_tables(tables)


def row(table: pa.Table, index: int) -> dict:
    """One row as a dict of Python values, without converting the whole table."""
    return table.slice(index, 1).to_pylist()[0]
