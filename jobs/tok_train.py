"""The tokenizer phase: train the run's BPE tokenizer on the training shards of the store.

    python -m jobs.tok_train --vocab-size 65536 --max-chars 2000000000

Writes <base dir>/tokenizer/token_bytes.pt, then tokenizer.pkl (last: a tokenizer dir with tokenizer.pkl is
complete), and the report's "Tokenizer training" section.
"""

import argparse
import time
from collections.abc import Iterator

from vibechat.common import VibechatError, positive_int, print0, run_main
from vibechat.dataset import DATASETS, dataset_name, parquets_iter_batched
from vibechat.report import get_report
from vibechat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, default_tokenizer_dir, save_token_bytes


def training_texts(dataset: str, max_chars: int, doc_cap: int, stats: dict) -> Iterator[str]:
    """Train-split documents cut to doc_cap chars (long documents would dominate the pair counts), until max_chars."""
    for texts in parquets_iter_batched("train", dataset=dataset):
        for text in texts:
            text = text[:doc_cap]
            stats["docs"] += 1
            stats["chars"] += len(text)
            yield text
            if stats["chars"] >= max_chars:
                return


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the run's tokenizer (rustbpe) on the store's train shards.")
    parser.add_argument("--vocab-size", type=positive_int, default=65536, help="tokens, special tokens included")
    parser.add_argument("--max-chars", type=positive_int, default=2_000_000_000, help="train on at most this much text")
    parser.add_argument("--doc-cap", type=positive_int, default=10_000, help="use at most this many chars of a doc")
    parser.add_argument("--dataset", default=None, choices=DATASETS, help="default: $VIBECHAT_DATASET or pydocs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dataset = dataset_name(args.dataset)

    stats = {"docs": 0, "chars": 0}
    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(
        training_texts(dataset, args.max_chars, args.doc_cap, stats), args.vocab_size
    )
    train_time = time.time() - t0
    print0(f"trained a {tokenizer.get_vocab_size()}-token tokenizer on {stats['chars']:,} chars "
           f"({stats['docs']:,} documents of {dataset}) in {train_time:.1f}s")

    sample = "Hello world! 12345 <|bos|> héllo 你好 \n\t tabs"
    if tokenizer.decode(tokenizer.encode(sample)) != sample:
        raise VibechatError("the trained tokenizer does not round-trip text: this is a bug, please report it")

    tokenizer_dir = default_tokenizer_dir()
    token_bytes = save_token_bytes(tokenizer, tokenizer_dir).float()
    tokenizer.save(tokenizer_dir)
    print0(f"saved the tokenizer to {tokenizer_dir}")

    ordinary = token_bytes[token_bytes > 0]
    get_report().log(section="Tokenizer training", data=[
        {"dataset": dataset, "vocab_size": args.vocab_size, "max_chars": args.max_chars, "doc_cap": args.doc_cap},
        {
            "train_chars": stats["chars"],
            "train_docs": stats["docs"],
            "train_time_s": train_time,
            "num_special_tokens": len(SPECIAL_TOKENS),
            "token_bytes_min": int(ordinary.min()),
            "token_bytes_max": int(ordinary.max()),
            "token_bytes_mean": ordinary.mean().item(),
            "token_bytes_std": ordinary.std().item(),
        },
    ])


if __name__ == "__main__":
    run_main(main)
