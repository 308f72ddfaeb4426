"""The one config loader: a preset from jobs/presets/<name>.yaml, with a user YAML merged over it.

A config says, for each phase, which program runs (`module`), its flags (`args`, a free-form
mapping: {num_iterations: 20} -> --num-iterations=20), whether it is skipped, and how big its job
is on Kubernetes (nnodes, nproc_per_node, gpus_per_node). Every other key is checked here: an
unknown one is an error that lists the valid ones. check_phase_args parses each phase's flags with
its program's own parse_args before a run starts, so a bad flag fails the start, not a later phase.
The `kubernetes` section and each phase's `resources` say where and how big its pods are
(jobs/backends/kubernetes.py).
"""

import contextlib
import copy
import difflib
import importlib
import io
import os
import re

import yaml

from jobs.pipeline import PHASE_PROGRAMS, PHASES, phase_argv
from vibechat.common import VibechatError

PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")

# what a phase gets for the keys its preset does not set
PHASE_DEFAULTS = {"module": None, "args": {}, "skip": False, "nnodes": 1, "nproc_per_node": 1, "gpus_per_node": 0,
                  "resources": {}}
# a pod's size, per node: a phase's `resources` are merged over these (GPU ones where it has GPUs)
CPU_RESOURCES = {"cpu": "2", "memory": "8Gi", "ephemeral_storage": "20Gi", "guaranteed": False}
GPU_RESOURCES = {"cpu": "16", "memory": "128Gi", "ephemeral_storage": "200Gi", "guaranteed": False}
# where the pods go and what they run as; every key optional in a preset
KUBERNETES_DEFAULTS = {
    "queue": None, "priority_class": None, "gang_scheduling": False, "node_selector": {}, "tolerations": [],
    "affinity": {}, "service_account": None, "image_pull_secrets": [], "s3_secret": "vibechat-s3", "env": {},
}

_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|[KMGTPE]i?|[eE][0-9]+)?")  # Kubernetes' resource.Quantity
_TOLERATION_KEYS = ("key", "operator", "value", "effect", "tolerationSeconds")
_AFFINITY_KEYS = ("nodeAffinity", "podAffinity", "podAntiAffinity")


def _quantity(value, where: str, dotted: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not _QUANTITY.fullmatch(str(value)):
        raise ConfigError(f"{where}: {dotted!r} should be a Kubernetes quantity like 4, 500m or 64Gi, not {value!r}")


def _string_map(value, where: str, dotted: str) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{where}: {dotted!r} should be a mapping of strings to strings (quote numbers), not {value!r}")


def _string_list(value, where: str, dotted: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {dotted!r} should be a list of names, not {value!r}")


def _tolerations(value, where: str, dotted: str) -> None:
    if not isinstance(value, list) or not all(isinstance(t, dict) and set(t) <= set(_TOLERATION_KEYS) for t in value):
        raise ConfigError(f"{where}: {dotted!r} should be a list of Kubernetes tolerations, mappings with keys "
                          f"{', '.join(_TOLERATION_KEYS)}; not {value!r}")


def _affinity(value, where: str, dotted: str) -> None:
    if not isinstance(value, dict) or not set(value) <= set(_AFFINITY_KEYS):
        raise ConfigError(f"{where}: {dotted!r} should be a Kubernetes affinity, a mapping with keys "
                          f"{', '.join(_AFFINITY_KEYS)}; not {value!r}")


# key -> type of its value, a checker function, or a nested schema; "args" values are the programs' business
_PHASE_SCHEMA = {
    "module": str, "args": dict, "skip": bool, "nnodes": int, "nproc_per_node": int, "gpus_per_node": int,
    "resources": {"cpu": _quantity, "memory": _quantity, "ephemeral_storage": _quantity, "guaranteed": bool},
}
SCHEMA = {
    "description": str,  # one line: what the preset is for
    "dataset": str,  # pretraining corpus under data/<dataset>/, passed to phases as VIBECHAT_DATASET
    "omp_num_threads": (int, type(None)),  # per process; null: all CPU cores of the machine
    "retries": {"max_attempts": int, "backoff_s": (int, float), "backoff_max_s": (int, float)},
    "kubernetes": {
        "namespace": str, "image": str,
        "queue": (str, type(None)),  # a Kueue LocalQueue: jobs are created suspended, for Kueue to admit
        "priority_class": (str, type(None)),
        "gang_scheduling": bool,  # all pods of a job start together (the operator needs a gang scheduler)
        "node_selector": _string_map, "tolerations": _tolerations, "affinity": _affinity,
        "service_account": (str, type(None)),  # the phase pods' identity, e.g. for cloud workload identity
        "image_pull_secrets": _string_list,
        "s3_secret": str,  # the Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
        "env": _string_map,  # extra environment of every phase pod
    },
    "phases": {name: _PHASE_SCHEMA for name in PHASES},
}
_POSITIVE = {"omp_num_threads", "max_attempts", "nnodes", "nproc_per_node"}
_NON_NEGATIVE = {"backoff_s", "backoff_max_s", "gpus_per_node"}
_ARG_VALUE = (str, int, float, bool, type(None))


class ConfigError(VibechatError):
    """A config or preset that cannot be used; the message names the file, the key and the fix."""


def preset_names() -> list[str]:
    return sorted(f[:-len(".yaml")] for f in os.listdir(PRESETS_DIR) if f.endswith(".yaml"))


def preset_path(name: str) -> str:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())}")
    return os.path.join(PRESETS_DIR, name + ".yaml")


def read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder: pass a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text: pass a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} should be a mapping of keys (dataset:, phases:, ...), "
                          f"not a {type(data).__name__}")
    return data


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping",
             type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def validate(config: dict, where: str, schema: dict = SCHEMA, path: str = "") -> None:
    """Raise ConfigError for the first unknown key, wrong type or impossible value (a partial config is fine)."""
    for key, value in config.items():
        dotted = f"{path}{key}"
        if key not in schema:
            valid = ", ".join(schema)
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            scope = f"under '{path[:-1]}'" if path else "at the top level"
            raise ConfigError(f"{where}: unknown key {dotted!r}{hint}; valid keys {scope}: {valid}")
        spec = schema[key]
        if callable(spec) and not isinstance(spec, type):
            spec(value, where, dotted)
            continue
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {dotted!r} should be a mapping with keys {', '.join(spec)}, not {value!r}")
            validate(value, where, spec, dotted + ".")
            continue
        types = spec if isinstance(spec, tuple) else (spec,)
        if float in types:
            types += (int,)
        # YAML's `yes` is a bool, and bool is an int to Python: keep them apart
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"{where}: {dotted!r} should be {_type_name(spec)}, not {value!r}")
        if key in _POSITIVE and value is not None and value < 1 or key in _NON_NEGATIVE and value < 0:
            bound = "at least 1" if key in _POSITIVE else ">= 0"
            raise ConfigError(f"{where}: {dotted!r} is {value}; it must be {bound}")
        if key == "args":
            _validate_args(value, where, dotted)


def _validate_args(args: dict, where: str, dotted: str) -> None:
    for name, value in args.items():
        values = value if isinstance(value, list) else [value]
        if not isinstance(name, str) or not all(isinstance(v, _ARG_VALUE) for v in values):
            raise ConfigError(f"{where}: {dotted}.{name} should be a flag value (string, number, true/false, null "
                              f"or a list of those), not {value!r}")


def merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def complete(config: dict, where: str) -> dict:
    """Fill every phase's defaults and check that nothing the controller needs is missing."""
    phases = config.get("phases", {})
    config = {**config, "phases": {}}
    for name in PHASES:
        phase = copy.deepcopy({**PHASE_DEFAULTS, **phases.get(name, {})})  # no dict shared between phases
        phase["module"] = phase["module"] or PHASE_PROGRAMS[name][0]
        phase["resources"] = {**(GPU_RESOURCES if phase["gpus_per_node"] else CPU_RESOURCES), **phase["resources"]}
        _check_guaranteed(phase["resources"], where, f"phases.{name}.resources")
        config["phases"][name] = phase
    config["kubernetes"] = copy.deepcopy({**KUBERNETES_DEFAULTS, **config.get("kubernetes", {})})
    missing = [k for k in SCHEMA if k not in config]
    missing += [f"{k}.{sub}" for k, spec in SCHEMA.items() if isinstance(spec, dict) and k in config and k != "phases"
                for sub in spec if sub not in config[k]]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    return config


def _check_guaranteed(resources: dict, where: str, dotted: str) -> None:
    # the kubelet's static CPU manager gives a Guaranteed pod exclusive cores only for whole CPUs
    if resources["guaranteed"] and not re.fullmatch(r"[0-9]+", str(resources["cpu"])):
        raise ConfigError(f"{where}: {dotted}.guaranteed needs whole CPUs, but cpu is {resources['cpu']!r}: "
                          "set cpu to an integer like 16")


def load_config(preset: str, config_file: str | None = None) -> dict:
    """The complete config of a run: the preset, with config_file (a YAML of the same shape) merged over it."""
    path = preset_path(preset)
    config = read_yaml(path)
    validate(config, path)
    where = f"preset {preset}"
    if config_file:
        user = read_yaml(config_file)
        validate(user, config_file)
        config = merge(config, user)
        where += f" with {config_file}"
    return complete(config, where)


def check_phase_args(config: dict, where: str) -> None:
    """Every phase that will run names an importable program, and its args parse with the program's parse_args
    (a program without one, say a user's, gets its args unchecked); ConfigError names the phase and the flag."""
    for name in PHASES:
        phase = config["phases"][name]
        if phase["skip"]:
            continue
        module = phase["module"]
        try:
            program = importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"{where}: phases.{name}.module {module!r} cannot be imported ({e}): name a module "
                              "on the Python path, e.g. " + PHASE_PROGRAMS[name][0]) from None
        parse_args = getattr(program, "parse_args", None)
        if parse_args is None:
            continue
        usage = io.StringIO()
        try:
            with contextlib.redirect_stderr(usage), contextlib.redirect_stdout(usage):
                parse_args(phase_argv(name, phase["args"]))
        except SystemExit:  # argparse's error: the last line is "prog: error: what"
            lines = usage.getvalue().strip().splitlines() or ["(no message)"]
            problem = lines[-1].split("error: ", 1)[-1]
            raise ConfigError(f"{where}: phases.{name}.args: {problem} (see python -m {module} --help)") from None
        except VibechatError as e:
            raise ConfigError(f"{where}: phases.{name}.args: {e}") from None
