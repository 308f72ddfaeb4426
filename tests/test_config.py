"""The config loader (jobs.config): the presets, merging a user YAML over them, and the errors for bad keys."""

import pytest

from jobs.config import CPU_RESOURCES, GPU_RESOURCES, KUBERNETES_DEFAULTS, ConfigError, PHASE_DEFAULTS, load_config, preset_names
from jobs.pipeline import PHASE_PROGRAMS, PHASES, phase_argv
from tasks.registry import TASKS

OFFLINE_TASKS = {"identity", "simplespelling", "spellingbee"} | {t for t in TASKS if t.endswith("-standin")}


def user_config(tmp_path, text: str) -> str:
    path = tmp_path / "my.yaml"
    path.write_text(text)
    return str(path)


# --- the presets --------------------------------------------------------------------------------

def test_the_presets_are_ci_tiny_one_gpu_d12_and_the_three_8_gpu_sizes():
    assert preset_names() == ["ci", "d12", "d20", "d26", "d32", "tiny"]


@pytest.mark.parametrize("preset", ["ci", "tiny", "d12", "d20", "d26", "d32"])
def test_every_preset_is_complete_for_every_phase(preset):
    config = load_config(preset)
    assert set(config["phases"]) == set(PHASES)
    for name, phase in config["phases"].items():
        assert set(phase) == set(PHASE_DEFAULTS)
        assert phase["module"] == PHASE_PROGRAMS[name][0]


def test_presets_grow_from_ci_to_d32():
    depth = {p: load_config(p)["phases"]["base"]["args"]["depth"] for p in preset_names()}
    assert depth["ci"] < depth["tiny"] < depth["d12"] < depth["d20"] < depth["d26"] < depth["d32"]
    ci, tiny = (load_config(p)["phases"]["base"]["args"] for p in ("ci", "tiny"))
    assert ci["num_iterations"] < tiny["num_iterations"] and ci["total_batch_size"] < tiny["total_batch_size"]


@pytest.mark.parametrize("preset", ["ci", "tiny", "d12"])
def test_the_small_presets_need_no_network(preset):
    config = load_config(preset)
    assert config["dataset"] == "pydocs"
    for name, phase in config["phases"].items():
        for task in phase["args"].get("tasks", []):
            assert task.split(":")[0] in OFFLINE_TASKS, f"{preset} {name} uses {task}, which downloads"


@pytest.mark.parametrize("preset", ["d20", "d26", "d32"])
def test_the_gpu_presets_pretrain_on_fineweb_with_8_gpus_per_training_phase(preset):
    config = load_config(preset)
    assert config["dataset"] == "fineweb-edu"
    for name in ("base", "base_eval", "mid", "mid_eval", "sft", "sft_eval", "rl", "rl_eval"):
        assert config["phases"][name]["gpus_per_node"] == config["phases"][name]["nproc_per_node"] == 8
    for name in ("data", "tokenizer", "tokenizer_eval", "export", "report"):
        assert config["phases"][name]["gpus_per_node"] == 0


def test_the_d12_preset_runs_every_gpu_phase_on_one_gpu():
    config = load_config("d12")
    for name, phase in config["phases"].items():
        on_gpu = name not in ("data", "tokenizer", "tokenizer_eval", "export", "report")
        assert (phase["gpus_per_node"], phase["nproc_per_node"]) == ((1 if on_gpu else 0), 1)


# --- merging a user config ----------------------------------------------------------------------

def test_a_user_config_is_merged_over_the_preset_key_by_key(tmp_path):
    path = user_config(tmp_path, "retries: {max_attempts: 5}\nphases:\n  base:\n    args: {num_iterations: 7}\n"
                                 "  rl: {skip: true}\n")
    config, preset = load_config("tiny", path), load_config("tiny")
    assert config["retries"] == {**preset["retries"], "max_attempts": 5}
    assert config["phases"]["base"]["args"] == {**preset["phases"]["base"]["args"], "num_iterations": 7}
    assert config["phases"]["rl"]["skip"] is True and config["phases"]["sft"] == preset["phases"]["sft"]


def test_null_in_a_user_config_drops_a_flag_of_the_preset(tmp_path):
    config = load_config("tiny", user_config(tmp_path, "phases:\n  base:\n    args: {eval_tokens: null}\n"))
    assert not any(a.startswith("--eval-tokens") for a in phase_argv("base", config["phases"]["base"]["args"]))
    assert "--depth=4" in phase_argv("base", config["phases"]["base"]["args"])


def test_a_user_config_can_swap_the_program_of_a_phase(tmp_path):
    config = load_config("ci", user_config(tmp_path, "phases:\n  rl:\n    module: mylab.my_rl\n"))
    assert config["phases"]["rl"]["module"] == "mylab.my_rl"


def test_an_empty_user_config_is_the_preset(tmp_path):
    assert load_config("ci", user_config(tmp_path, "")) == load_config("ci")


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("datset: fineweb-edu\n",
     "unknown key 'datset' (did you mean 'dataset'?); valid keys at the top level: description, dataset, "
     "omp_num_threads, retries, kubernetes, phases"),
    ("retries: {max_attempt: 3}\n",
     "unknown key 'retries.max_attempt' (did you mean 'max_attempts'?); valid keys under 'retries': max_attempts, "
     "backoff_s, backoff_max_s"),
    ("phases: {pretrain: {skip: true}}\n",
     "unknown key 'phases.pretrain'; valid keys under 'phases': data, tokenizer, tokenizer_eval, base, base_eval"),
    ("phases: {base: {argz: {depth: 4}}}\n",
     "unknown key 'phases.base.argz' (did you mean 'args'?); valid keys under 'phases.base': module, args, skip, "
     "nnodes, nproc_per_node, gpus_per_node, resources"),
    ("kubernetes: {namespce: ml}\n", "unknown key 'kubernetes.namespce' (did you mean 'namespace'?)"),
])
def test_an_unknown_key_is_named_with_the_valid_ones_at_its_level(tmp_path, text, message):
    path = user_config(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config("tiny", path)
    assert str(e.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize("text, message", [
    ("phases: {base: {skip: maybe}}\n", "'phases.base.skip' should be true or false, not 'maybe'"),
    ("phases: {base: {nnodes: 0}}\n", "'phases.base.nnodes' is 0; it must be at least 1"),
    ("phases: {base: {nproc_per_node: yes}}\n", "'phases.base.nproc_per_node' should be an integer, not True"),
    ("phases: {base: 3}\n", "'phases.base' should be a mapping with keys module, args"),
    ("phases: {base: {args: {depth: {deep: 1}}}}\n", "phases.base.args.depth should be a flag value"),
    ("retries: {backoff_s: -1}\n", "'retries.backoff_s' is -1; it must be >= 0"),
    ("dataset: [a, b]\n", "'dataset' should be a string, not ['a', 'b']"),
    ("- dataset\n", "should be a mapping of keys (dataset:, phases:, ...), not a list"),
    ("phases: {base: {args: [}\n", "is not valid YAML"),
    ("kubernetes: {queue: 3}\n", "'kubernetes.queue' should be a string or null, not 3"),
    ("kubernetes: {node_selector: {gpu: true}}\n", "'kubernetes.node_selector' should be a mapping of strings to strings"),
    ("kubernetes: {env: [A=1]}\n", "'kubernetes.env' should be a mapping of strings to strings"),
    ("kubernetes: {tolerations: [{key: gpu, efect: NoSchedule}]}\n",
     "'kubernetes.tolerations' should be a list of Kubernetes tolerations, mappings with keys key, operator"),
    ("kubernetes: {affinity: {nodeAfinity: {}}}\n", "'kubernetes.affinity' should be a Kubernetes affinity"),
    ("kubernetes: {image_pull_secrets: regcred}\n", "'kubernetes.image_pull_secrets' should be a list of names"),
    ("kubernetes: {gang_scheduling: 2}\n", "'kubernetes.gang_scheduling' should be true or false"),
    ("phases: {base: {resources: {memory: 64GB}}}\n",
     "'phases.base.resources.memory' should be a Kubernetes quantity like 4, 500m or 64Gi, not '64GB'"),
    ("phases: {base: {resources: {cpu: true}}}\n", "'phases.base.resources.cpu' should be a Kubernetes quantity"),
    ("phases: {base: {resources: {gpus: 8}}}\n", "unknown key 'phases.base.resources.gpus'"),
])
def test_a_wrong_value_is_named_with_what_it_should_be(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", user_config(tmp_path, text))
    assert message in str(e.value)


def test_a_guaranteed_phase_needs_whole_cpus(tmp_path):
    path = user_config(tmp_path, "phases: {base: {resources: {cpu: 1500m, guaranteed: true}}}\n")
    with pytest.raises(ConfigError, match="phases.base.resources.guaranteed needs whole CPUs, but cpu is '1500m'"):
        load_config("tiny", path)


def test_kubernetes_settings_default_to_no_queue_no_placement_and_the_vibechat_s3_secret():
    assert load_config("tiny")["kubernetes"] == {**KUBERNETES_DEFAULTS, "namespace": "vibechat", "image": "vibechat:0.1.0"}


def test_a_phase_gets_the_cpu_or_gpu_pod_size_with_its_own_keys_over_it(tmp_path):
    config = load_config("d20", user_config(tmp_path, "phases: {base: {resources: {memory: 512Gi}}}\n"))
    assert config["phases"]["tokenizer"]["resources"] == CPU_RESOURCES
    assert config["phases"]["base"]["resources"] == {**GPU_RESOURCES, "memory": "512Gi"}


def test_an_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="unknown preset 'd40': choose one of ci, d12, d20, d26, d32, tiny"):
        load_config("d40")


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist"):
        load_config("tiny", str(tmp_path / "nope.yaml"))
