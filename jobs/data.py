"""The data phase: put the pretraining corpus's shards into the store, once; shards already there are kept.

    python -m jobs.data --dataset pydocs                      # build the offline corpus (~12 shards)
    python -m jobs.data --dataset fineweb-edu --num-shards 240

The dataset defaults to $VIBECHAT_DATASET, else pydocs; the store is $VIBECHAT_STORE (see vibechat.dataset).
"""

from vibechat.common import run_main
from vibechat.dataset import main, parse_args  # noqa: F401 (parse_args: the controller checks a run's args)

if __name__ == "__main__":
    run_main(main)
