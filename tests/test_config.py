import pathlib

import pytest

from ckf_dist.config import ConfigError, load_config

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_loads_and_validates(path):
    cfg = load_config(["--config", str(path)])
    assert cfg.training.max_steps >= 1 and cfg.lora.rank >= 1


def test_defaults_are_the_embedded_cpu_run():
    cfg = load_config([])
    assert cfg.data.source == "synthetic" and cfg.model.source == "tiny"
    assert cfg.deepspeed.zero_stage == 3 and cfg.ray.num_workers == 2


def test_dotlist_overrides_and_types():
    cfg = load_config(["training.max_steps=7", "lora.task_targets=[q_proj,v_proj]", "training.task_weights={ctr: 2.0}"])
    assert cfg.training.max_steps == 7
    assert cfg.lora.task_targets == ["q_proj", "v_proj"]
    assert cfg.training.task_weights == {"ctr": 2.0}


@pytest.mark.parametrize("arg,needle", [
    ("training.max_stepz=5", "training.max_stepz"),
    ("trainng.max_steps=5", "trainng"),
    ("training.max_steps=many", "training.max_steps"),
    ("lora.impl=cuda", "lora.impl"),
    ("data.tasks=[ctr,ranking]", "data.tasks"),
    ("training.task_weights={clicks: 1.0}", "training.task_weights"),
    ("lora.rank=0", "lora.rank"),
    ("training.max_minutes=-1", "training.max_minutes"),
    ("model.zero_init=yes", "model.zero_init"),
    ("model.zero_init=true", "model.zero_init=true needs model.source=hf"),  # the tiny model
    ("profile.steps=1", "profile.steps"),
    ("profile.trace_steps=-1", "profile.trace_steps"),
    ("profile.peak_tflops=-5", "profile.peak_tflops"),
])
def test_bad_keys_and_values_are_named(arg, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config([arg])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  max_steps: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*training\.learning_rate"):
        load_config(["--config", str(bad)])


def test_missing_yaml_and_bad_argument():
    with pytest.raises(ConfigError, match="not found"):
        load_config(["--config", "/nonexistent/x.yaml"])
    with pytest.raises(ConfigError, match="cannot read argument"):
        load_config(["--max-steps", "3"])


def test_zero_init_auto_is_on_for_hf_models_under_zero3():
    from ckf_dist.worker import build_deepspeed_config, zero_init_config

    def sharded(*args):
        cfg = load_config(list(args))
        return zero_init_config(cfg, build_deepspeed_config(cfg, 2, use_gpu=False)) is not None

    assert not sharded()  # the tiny model
    assert sharded("model.source=hf", "model.path=/m") and sharded("model.source=hf", "model.path=/m",
                                                                     "model.zero_init=true")
    assert not sharded("model.source=hf", "model.path=/m", "model.zero_init=false")
    assert not sharded("model.source=hf", "model.path=/m", "deepspeed.zero_stage=2")
    assert not sharded("model.source=gguf", "model.path=/m.gguf")
    # deepspeed.extra may change the stage: the merged DeepSpeed config decides
    assert not sharded("model.source=hf", "model.path=/m", "deepspeed.extra={zero_optimization: {stage: 2}}")
