"""Tokenizer evaluation: compression (bytes of text per token) of the run's tokenizer on held-out val text,
beside GPT-2's and GPT-4's (cl100k_base) where tiktoken can load them (it downloads them on first use, so
offline they are reported as unavailable).

    python -m jobs.tok_eval --max-docs 1000
"""

import argparse

from vibechat.common import positive_int, print0, run_main
from vibechat.dataset import DATASETS, dataset_name, parquets_iter_batched
from vibechat.report import get_report
from vibechat.tokenizer import RustBPETokenizer, TokenizerError, get_tokenizer

REFERENCES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}


def val_texts(dataset: str, max_docs: int) -> list[str]:
    texts = []
    for batch in parquets_iter_batched("val", dataset=dataset):
        texts.extend(batch[: max_docs - len(texts)])
        if len(texts) >= max_docs:
            break
    return texts


def compression(tokenizer, texts: list[str]) -> dict:
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    num_tokens = sum(len(ids) for ids in tokenizer.encode(texts))
    return {"bytes": num_bytes, "tokens": num_tokens, "bytes_per_token": round(num_bytes / max(num_tokens, 1), 3)}


def compression_table(tokenizer, texts: list[str]) -> list[dict]:
    """One row per tokenizer: ours, then the references (a row with `unavailable` where tiktoken can't load one)."""
    rows = [{"tokenizer": "vibechat", "vocab_size": tokenizer.get_vocab_size(), **compression(tokenizer, texts)}]
    for name, encoding in REFERENCES.items():
        try:
            reference = RustBPETokenizer.from_pretrained(encoding)
        except TokenizerError:
            rows.append({"tokenizer": name, "unavailable": "offline (tiktoken could not load it)"})
            continue
        rows.append({"tokenizer": name, "vocab_size": reference.get_vocab_size(), **compression(reference, texts)})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compression of the run's tokenizer on val text, vs GPT-2/GPT-4.")
    parser.add_argument("--max-docs", type=positive_int, default=1000, help="val documents to encode")
    parser.add_argument("--dataset", default=None, choices=DATASETS, help="default: $VIBECHAT_DATASET or pydocs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    texts = val_texts(dataset_name(args.dataset), args.max_docs)
    rows = compression_table(get_tokenizer(), texts)
    print0(f"{'tokenizer':<10} {'vocab':>8} {'bytes':>10} {'tokens':>10} {'bytes/token':>12}")
    for row in rows:
        if "unavailable" in row:
            print0(f"{row['tokenizer']:<10} unavailable offline")
        else:
            print0(f"{row['tokenizer']:<10} {row['vocab_size']:>8} {row['bytes']:>10} {row['tokens']:>10} "
                   f"{row['bytes_per_token']:>12}")
    get_report().log(section="Tokenizer evaluation", data=[f"{len(texts)} val documents", *rows])


if __name__ == "__main__":
    run_main(main)
