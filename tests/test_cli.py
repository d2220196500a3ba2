"""One CLI across the entry points: ``--help`` on train, data.prepare, cf_refresh and evaluate lists every config
key with its default and its doc (read from config.py's comments, so it cannot drift) and exits 0; an unknown key
still fails naming it. And the driver's GPU decision (issue 13, finding 8): ``ray.use_gpu=true`` on a cluster with
fewer GPUs than workers waits for them (autoscaling) instead of refusing to start."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

ENTRY_POINTS = ["ckf_dist.train", "ckf_dist.data.prepare", "ckf_dist.cf_refresh", "ckf_dist.evaluate",
                "ckf_dist.profile"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_lists_every_config_key_and_exits_0(module):
    """Before: ``ckf_dist.train --help`` and ``ckf_dist.data.prepare --help`` exited 2 ("cannot read argument
    '--help'"); cf_refresh printed its docstring only, evaluate argparse's options only."""
    from ckf_dist.config import config_keys

    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith(f"usage: python -m {module} [-h]")
    assert "--config FILE" in out and "key=value" in out
    flat = " ".join(out.split())
    for group, key, default, doc in config_keys():
        assert f"  {group}.{key}={default}" in out, (group, key)
        if doc:
            assert " ".join(doc.split()) in flat, (group, key, doc)
    for group in ("data:", "data.s3:", "model.tiny:", "training:", "ray:", "eval:"):
        assert f"\n{group}" in out
    assert "training.max_steps=800" in out and "rows (samples) per worker per step" in out


def test_each_entry_point_shows_its_own_options():
    helps = {m: subprocess.run([sys.executable, "-m", m, "-h"], capture_output=True, text=True, timeout=300).stdout
             for m in ENTRY_POINTS}
    assert "--verbose" in helps["ckf_dist.train"] and "--verbose" in helps["ckf_dist.profile"]
    assert "--force" in helps["ckf_dist.data.prepare"]
    assert "--every INTERVAL" in helps["ckf_dist.cf_refresh"] and "--max-runs N" in helps["ckf_dist.cf_refresh"]
    for flag in ("--checkpoint", "--baseline {none,cf-only}", "--compare REPORT [REPORT ...]", "--chart"):
        assert flag in helps["ckf_dist.evaluate"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_unknown_key_still_fails_naming_it(module, capsys):
    main = importlib.import_module(module).main
    assert main(["training.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "training.max_stepz" in err and "max_steps" in err


def test_field_docs_are_the_comments_of_the_definition(tmp_path, monkeypatch):
    from ckf_dist.config import field_docs

    (tmp_path / "docs_probe.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass, field

        @dataclass
        class Probe:
            """A probe."""

            alpha: int = 1  # the trailing comment wins
            # a block above,
            # on two lines
            beta: str = "x"
            gamma: float = 0.5
            # above, but the trailing one wins
            delta: list = field(
                default_factory=list)  # on the last line of the field
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("docs_probe")
    assert field_docs(probe.Probe) == {"alpha": "the trailing comment wins", "beta": "a block above, on two lines",
                                       "gamma": "", "delta": "on the last line of the field"}


def test_help_flag_in_load_config_is_not_a_config_error():
    from ckf_dist.config import ConfigError, HelpRequested, load_config

    with pytest.raises(HelpRequested):
        load_config(["training.max_steps=3", "--help"])
    assert not issubclass(HelpRequested, ConfigError)


def test_gpu_plan_waits_for_gpus_instead_of_refusing():
    """Before: ``init_ray`` raised ConfigError("ray.use_gpu=true but the cluster has 0 GPUs for 8 workers") on an
    autoscaling cluster with no GPU worker yet."""
    from ckf_dist.train import gpu_plan

    assert gpu_plan("true", 0, 8, 1.0) == (True, "waiting for 8 GPUs: the cluster has 0 now (autoscaling)")
    assert gpu_plan("true", 4, 8, 1.0) == (True, "waiting for 8 GPUs: the cluster has 4 now (autoscaling)")
    assert gpu_plan("true", 8, 8, 1.0) == (True, None)
    assert gpu_plan("true", 2, 4, 0.5) == (True, None)
    assert gpu_plan("auto", 0, 8, 1.0) == (False, None)  # auto without any GPU: CPU training
    assert gpu_plan("auto", 2, 8, 1.0) == (True, "waiting for 8 GPUs: the cluster has 2 now (autoscaling)")
    assert gpu_plan("false", 8, 8, 1.0) == (False, None)


def test_init_ray_connected_to_a_cluster_without_gpus_does_not_raise(monkeypatch, capsys):
    import ray

    from ckf_dist import train
    from ckf_dist.config import load_config

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    cfg = load_config(["ray.use_gpu=true", "ray.num_workers=8"])
    assert train.init_ray(cfg) is True
    assert "waiting for 8 GPUs: the cluster has 0 now (autoscaling)" in capsys.readouterr().out


def test_gpu_wait_repeats_only_on_change_or_after_a_while(monkeypatch, capsys):
    import ray

    from ckf_dist import train
    from ckf_dist.config import load_config

    gpus = {"GPU": 0.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(gpus))
    clock = [1000.0]
    monkeypatch.setattr(train.time, "monotonic", lambda: clock[0])
    wait = train.GpuWait(load_config(["ray.use_gpu=true", "ray.num_workers=2"]), use_gpu=True, every_s=60)
    for t, g in ((1006, 0), (1012, 0), (1020, 1), (1030, 1), (1081, 1), (1090, 2)):
        clock[0], gpus["GPU"] = t, g
        wait(False)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[ckf_dist] waiting for 2 GPUs: the cluster has 0 now (autoscaling)",
                     "[ckf_dist] waiting for 2 GPUs: the cluster has 1 now (autoscaling)",
                     "[ckf_dist] waiting for 2 GPUs: the cluster has 1 now (autoscaling)"]
    wait(True)  # the workers started: nothing more
    assert capsys.readouterr().out == ""
