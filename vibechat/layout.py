"""The store's layout: the one module that spells out where things live, and the stages that train a model.

Under the store root:
    data/<dataset>/shard_NNNNN.parquet      pretraining shards, shared by runs
    data/tasks/<name>/<path>                task files from the Hugging Face hub, shared by runs
    data/eval_bundle/                       the CORE eval bundle, unpacked
    runs/<run_id>/                          one run; a phase's base dir (common.get_base_dir)

Under a run's folder:
    run.json                                the run spec and every phase's state (the controller's)
    tokenizer/                              tokenizer.pkl, token_bytes.pt
    checkpoints/<stage>/<model_tag>/        model_, optim_ and meta_<step> files (checkpoint_manager)
    metrics/<phase>.jsonl                   one JSON object per logged step (metrics)
    report/                                 a section per phase and report.md (report)
    export/hf/                              the last stage's model as a transformers folder (jobs.export)
    logs/<phase>-<attempt>.log              the output of each attempt of a phase
    live/<phase>-<attempt>.json             whether the attempt's process is alive (vibechat.liveness)
    export/hf/                              the last stage as a transformers NanoChat folder (jobs.export)
"""

import re

STAGES = ("base", "mid", "sft", "rl")  # the stages that train a model, in pipeline order

RUNS_DIR = "runs"
RUN_FILE = "run.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
METRICS_DIR = "metrics"
REPORT_DIR = "report"
REPORT_NAME = "report.md"
REPORT_FILE = f"{REPORT_DIR}/{REPORT_NAME}"
EXPORT_DIR = "export/hf"
EVAL_BUNDLE_DIR = "data/eval_bundle"
SHARD_NAME = re.compile(r"shard_(\d{5})\.parquet")

_RUN_FILE_KEY = re.compile(rf"{RUNS_DIR}/([^/]+)/run\.json")
_METRICS_KEY = re.compile(rf"{METRICS_DIR}/([^/]+)\.jsonl")
_META_KEY = re.compile(rf"{CHECKPOINTS_DIR}/([^/]+)/([^/]+)/meta_(\d+)\.json")


def join(base: str, key: str) -> str:
    """A key under a folder given as a path or URL (a run's base dir, a store root)."""
    return f"{base.rstrip('/')}/{key}"


# --- the store root -------------------------------------------------------------------------------

def run_dir(run_id: str) -> str:
    return f"{RUNS_DIR}/{run_id}"


def in_run(run_id: str, key: str) -> str:
    """The store key of `key` (one of the run-relative keys below) in run `run_id`."""
    return join(run_dir(run_id), key)


def run_ids(keys: list[str]) -> list[str]:
    """The runs among store keys (listed under RUNS_DIR): the folders that hold a run.json, sorted."""
    return sorted(m.group(1) for key in keys if (m := _RUN_FILE_KEY.fullmatch(key)))


def dataset_dir(dataset: str) -> str:
    return f"data/{dataset}"


def shard_key(dataset: str, index: int) -> str:
    return f"{dataset_dir(dataset)}/shard_{index:05d}.parquet"


def task_file_key(name: str, path: str) -> str:
    return f"data/tasks/{name}/{path}"


# --- inside a run's folder ------------------------------------------------------------------------

def checkpoint_dir(stage: str, model_tag: str | None = None) -> str:
    """checkpoints/<stage>, or the folder of one model tag in it."""
    return f"{CHECKPOINTS_DIR}/{stage}" + (f"/{model_tag}" if model_tag else "")


def checkpoint_meta(key: str) -> tuple[str, str, int] | None:
    """(stage, model tag, step) of a run-relative key that is a checkpoint's commit mark, else None."""
    m = _META_KEY.fullmatch(key)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def metrics_key(phase: str) -> str:
    return f"{METRICS_DIR}/{phase}.jsonl"


def eval_metrics_key(stage: str) -> str:
    """Where the evaluation of a stage writes its scores, one record per task."""
    return metrics_key(f"{stage}_eval")


def metrics_phase(key: str) -> str | None:
    """The phase of a run-relative key that is a metrics file (not a later segment of one), else None."""
    m = _METRICS_KEY.fullmatch(key)
    return m.group(1) if m else None


def log_key(phase: str, attempt: int) -> str:
    return f"logs/{phase}-{attempt}.log"


def liveness_key(phase: str, attempt: int) -> str:
    return f"live/{phase}-{attempt}.json"
