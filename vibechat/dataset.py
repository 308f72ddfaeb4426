"""Pretraining data: parquet shards with one `text` column at <store>/data/<dataset>/shard_NNNNN.parquet.

Two corpora fill them:
- fineweb-edu: FineWeb-Edu, pre-shuffled into ~100 MB shards on the HuggingFace hub, downloaded over HTTP
  (the cluster default);
- pydocs: the docstrings of the Python standard library and its reference topics (pydoc_data), built offline
  from the .py sources of the running Python (the embedded default: any machine with Python has it).

The last shard of a dataset is its validation split, the others are the training split.

    python -m vibechat.dataset -n 8 --dataset fineweb-edu    # download shards 0..7 into the store
"""

import argparse
import ast
import io
import os
import random
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from vibechat.common import VibechatError, get_store_url, print0, run_main
from vibechat.layout import SHARD_NAME, dataset_dir, shard_key
from vibechat.storage import Store, open_store

DATASETS = ("pydocs", "fineweb-edu")
DEFAULT_DATASET = "pydocs"
FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_NUM_SHARDS = 1823  # shard_00000 .. shard_01822


class DataError(VibechatError):
    """A shard is missing, unreadable or not in the expected format, or a download failed."""


def dataset_name(dataset: str | None = None) -> str:
    """The dataset asked for, else $VIBECHAT_DATASET, else pydocs. Readers take any name with shards in the store."""
    return dataset or os.environ.get("VIBECHAT_DATASET") or DEFAULT_DATASET


def data_store() -> Store:
    """The store root: shards are shared by all runs, so they live beside runs/, not in a run."""
    return open_store(get_store_url())


def write_shard(store: Store, dataset: str, index: int, texts: list[str], row_group_size: int = 1024) -> str:
    """Write one shard; the store writes a temp object and renames it, so readers never see half a shard."""
    buffer = io.BytesIO()
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    pq.write_table(table, buffer, row_group_size=row_group_size, compression="zstd")
    key = shard_key(dataset, index)
    store.put_bytes(key, buffer.getvalue())
    return key


def list_shards(store: Store, dataset: str) -> list[str]:
    """Keys of the dataset's shards, in index order."""
    return [k for k in store.list(dataset_dir(dataset) + "/") if SHARD_NAME.fullmatch(k.rsplit("/", 1)[-1])]


def split_shards(store: Store, dataset: str, split: str) -> list[str]:
    """The shards of a split: "val" is the last shard, "train" all the others."""
    if split not in ("train", "val"):
        raise DataError(f"unknown split {split!r}: use 'train' or 'val'")
    shards = list_shards(store, dataset)
    if len(shards) < 2:
        raise DataError(
            f"{store.uri(dataset_dir(dataset))} holds {len(shards)} shard(s) but a dataset needs at least 2 "
            f"(train + val): prepare it with python -m jobs.data --dataset {dataset}"
        )
    return shards[:-1] if split == "train" else shards[-1:]


@dataclass
class Shard:
    """One shard, read into memory; texts(i) is the `text` column of row group i."""

    uri: str
    file: pq.ParquetFile

    @property
    def num_row_groups(self) -> int:
        return self.file.num_row_groups

    def texts(self, row_group: int) -> list[str]:
        try:
            return self.file.read_row_group(row_group, columns=["text"]).column("text").to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise corrupt(self.uri, e) from None


def corrupt(uri: str, error: Exception) -> DataError:
    return DataError(f"shard {uri} is corrupt ({error}): delete it and rerun python -m jobs.data to fetch it again")


def open_shard(store: Store, key: str) -> Shard:
    uri = store.uri(key)
    try:
        file = pq.ParquetFile(pa.BufferReader(store.get_bytes(key)))
    except FileNotFoundError:
        raise DataError(f"shard {uri} is missing: rerun python -m jobs.data") from None
    except (pa.ArrowException, OSError) as e:
        raise corrupt(uri, e) from None
    check_schema(file.schema_arrow, uri)
    return Shard(uri, file)


def check_schema(schema: pa.Schema, uri: str) -> None:
    if "text" not in schema.names:
        raise DataError(f"shard {uri} has no 'text' column (columns: {schema.names}): it is not a vibechat shard")
    if not pa.types.is_string(schema.field("text").type) and not pa.types.is_large_string(schema.field("text").type):
        raise DataError(
            f"shard {uri}: column 'text' holds {schema.field('text').type}, not UTF-8 strings: "
            "rewrite it with vibechat.dataset.write_shard"
        )


def parquets_iter_batched(
    split: str, start: int = 0, step: int = 1, dataset: str | None = None, store: Store | None = None
) -> Iterator[list[str]]:
    """The texts of row groups start, start + step, ... of every shard of the split, one list per row group."""
    store = store or data_store()
    for key in split_shards(store, dataset_name(dataset), split):
        shard = open_shard(store, key)
        for row_group in range(start, shard.num_row_groups, step):
            yield shard.texts(row_group)


# ----------------------------------------------------------------------------------------------------------
# pydocs: the offline corpus

PYDOCS_SHARD_CHARS = 250_000
PYDOCS_ROW_GROUP_SIZE = 8  # documents are whole modules (~2K chars): small row groups spread them over ranks
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def pydocs_documents(root: str | None = None) -> list[str]:
    """One document per .py file under root (default: the standard library, site-packages excluded):
    the module's docstring and those of its classes and functions, in source order. The sources are
    parsed, never imported, so modules with side effects (antigravity, this, tkinter) are safe."""
    root = root or sysconfig.get_paths()["stdlib"]
    documents = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, filename)
            with open(path, "rb") as f:
                source = f.read()
            try:
                tree = ast.parse(source)  # honours the file's coding cookie
            except (SyntaxError, ValueError):
                continue  # the stdlib ships a few deliberately broken files (test data)
            module = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
            if module == "pydoc_data.topics":
                documents.extend(pydoc_topics(tree))
            elif text := module_docs(tree, module):
                documents.append(text)
    return documents


def module_docs(tree: ast.Module, module: str) -> str:
    parts = [f"{module}\n\n{ast.get_docstring(tree)}"] if ast.get_docstring(tree) else []
    for node in definitions(tree.body):
        if doc := ast.get_docstring(node):
            if isinstance(node, ast.ClassDef):
                parts.append(f"class {node.name}\n{doc}")
            else:
                parts.append(f"def {node.name}({ast.unparse(node.args)})\n{doc}")
    return "\n\n".join(parts)


def definitions(body: list) -> Iterator[ast.AST]:
    """Classes and functions in a block, also nested in classes and under if/try/with/..., in source order.
    Only statement blocks are visited: expressions, most of the tree, hold no definitions."""
    for node in body:
        if isinstance(node, DEFINITIONS):
            yield node
        for block in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, block, None)
            if isinstance(children, list):
                yield from definitions(children)


def pydoc_topics(tree: ast.Module) -> list[str]:
    """pydoc_data/topics.py is the language reference as a dict literal `topics = {name: text}`."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return [text for text in ast.literal_eval(node.value).values() if text.strip()]
    return []


def build_pydocs(
    store: Store, root: str | None = None, shard_chars: int = PYDOCS_SHARD_CHARS, dataset: str = "pydocs"
) -> list[str]:
    """Write the pydocs corpus as shards of ~shard_chars characters; shards already in the store are kept."""
    documents = pydocs_documents(root)
    random.Random(1337).shuffle(documents)  # mix packages, so the last (val) shard is not all one package
    total = sum(len(doc) for doc in documents)
    num_shards = round(total / shard_chars)
    if num_shards < 2:
        raise DataError(f"{root} has {total:,} chars of docstrings: too few for 2 shards (train, val) of "
                        f"{shard_chars:,}")
    # a document goes to the shard its first character falls in, so every shard (val too) gets ~total/num_shards
    shards, start = [[] for _ in range(num_shards)], 0
    for doc in documents:
        shards[start * num_shards // total].append(doc)
        start += len(doc)
    shards = [texts for texts in shards if texts]  # a document longer than a shard can leave one empty
    print0(f"pydocs: {len(documents):,} documents, {total:,} chars, {len(shards)} shards")
    existing = set(list_shards(store, dataset))
    for index, texts in enumerate(shards):
        if shard_key(dataset, index) not in existing:
            write_shard(store, dataset, index, texts, row_group_size=PYDOCS_ROW_GROUP_SIZE)
        print0(f"step {index + 1}/{len(shards)} | {store.uri(shard_key(dataset, index))}")
    return [shard_key(dataset, i) for i in range(len(shards))]


# ----------------------------------------------------------------------------------------------------------
# fineweb-edu: the download


class TransientError(Exception):
    """A download attempt failed in a way worth retrying."""


def download_shards(
    store: Store,
    indices: list[int],
    dataset: str = "fineweb-edu",
    base_url: str = FINEWEB_URL,
    workers: int = 4,
    attempts: int = 5,
    backoff_s: float = 2.0,
    download_dir: str | None = None,
) -> list[str]:
    """Download shard_{i:05d}.parquet for each index into the store (shards already there are skipped)."""
    download_dir = download_dir or os.path.join(tempfile.gettempdir(), "vibechat-downloads", dataset)
    os.makedirs(download_dir, exist_ok=True)

    def fetch(index: int) -> str:
        return download_shard(store, dataset, index, base_url, attempts, backoff_s, download_dir)

    keys = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for key in pool.map(fetch, indices):
            keys.append(key)
            print0(f"step {len(keys)}/{len(indices)} | {store.uri(key)}")
    return keys


def download_shard(
    store: Store, dataset: str, index: int, base_url: str, attempts: int, backoff_s: float, download_dir: str
) -> str:
    key = shard_key(dataset, index)
    if store.exists(key):
        return key
    url = f"{base_url.rstrip('/')}/shard_{index:05d}.parquet"
    # a partial download survives a killed process: the next attempt asks for the rest (HTTP Range)
    part = os.path.join(download_dir, f"shard_{index:05d}.parquet.part")
    for attempt in range(attempts):
        try:
            fetch_to(url, part)
            verify_download(part, url)
            break
        except TransientError as e:
            if attempt == attempts - 1:
                raise DataError(
                    f"could not download {url} in {attempts} attempts ({e}): check the network and rerun "
                    "(finished shards are kept and partial ones resume)"
                ) from None
            time.sleep(backoff_s * 2**attempt)
    store.put_file(part, key)
    os.remove(part)
    return key


def fetch_to(url: str, part: str) -> None:
    """Append the bytes of url that part does not have yet (all of them if the server ignores Range)."""
    import requests

    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=(10, 60)) as response:
            if response.status_code == 416:  # we already have every byte
                return
            if response.status_code == 404:
                raise DataError(f"{url} does not exist (404): check the shard index and --base-url")
            if response.status_code >= 400:
                raise TransientError(f"HTTP {response.status_code}")
            with open(part, "ab" if response.status_code == 206 else "wb") as f:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
    except requests.RequestException as e:
        raise TransientError(f"{type(e).__name__}: {e}") from None


def verify_download(part: str, url: str) -> None:
    """A complete shard has a readable parquet footer and a text column; anything else is downloaded again."""
    try:
        schema = pq.ParquetFile(part).schema_arrow
    except (pa.ArrowException, OSError) as e:
        os.remove(part)
        raise TransientError(f"the download is not a complete parquet file: {e}") from None
    try:
        check_schema(schema, url)
    except DataError:
        os.remove(part)
        raise


# ----------------------------------------------------------------------------------------------------------


def prepare(store: Store, dataset: str, num_shards: int, workers: int = 4, base_url: str = FINEWEB_URL) -> list[str]:
    """Put the dataset's shards in the store: build pydocs, or download FineWeb-Edu shards 0..num_shards-1."""
    if dataset == "pydocs":
        return build_pydocs(store)
    if dataset != "fineweb-edu":
        raise DataError(f"unknown dataset {dataset!r}: the data phase prepares one of {', '.join(DATASETS)}")
    if not 2 <= num_shards <= FINEWEB_NUM_SHARDS:
        raise DataError(f"--num-shards {num_shards}: FineWeb-Edu needs 2..{FINEWEB_NUM_SHARDS} shards (train + val)")
    return download_shards(store, list(range(num_shards)), dataset, base_url=base_url, workers=workers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Put pretraining shards into the store ($VIBECHAT_STORE): build pydocs offline, or download "
        "FineWeb-Edu shards 0..N-1. Shards already in the store are kept. The last shard is the val split."
    )
    parser.add_argument("-n", "--num-shards", type=int, default=240, help="FineWeb-Edu shards to download, ~100 MB "
                        "and ~55M GPT-2 tokens each (ignored for pydocs, which is built whole)")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--dataset", default=None, choices=DATASETS, help="default: $VIBECHAT_DATASET or pydocs")
    parser.add_argument("--base-url", default=FINEWEB_URL, help="where the FineWeb-Edu shards are served")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dataset = dataset_name(args.dataset)
    store = data_store()
    keys = prepare(store, dataset, args.num_shards, args.workers, args.base_url)
    print0(f"{dataset}: {len(keys)} shards in {store.uri(dataset_dir(dataset))} (the last one is the val split)")


if __name__ == "__main__":
    run_main(main)
