"""``ckf_dist.kernels`` (the top-level ``kernels/`` folder) imports in every way the package is run: an editable
install, a wheel install run from the repo folder (= the Docker image, whose working directory holds the sources),
a source tree with no install at all (= ``ray job submit --working-dir .``: tests/test_job_submit.py), and a wheel
install anywhere else. Never as a top-level ``kernels`` module (PyPI's ``kernels`` owns that name)."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

from tests.wheel_env import REPO, build_wheel_env

PROBE = ("import importlib.util, ckf_dist, ckf_dist.kernels, ckf_dist.kernels.reference, ckf_dist.model.multi_lora; "
         "print('PROBE', ckf_dist.__file__, ckf_dist.kernels.__file__, importlib.util.find_spec('kernels'), sep='|')")


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    return build_wheel_env(tmp_path_factory.mktemp("wheel_env"))


def _probe(python, cwd, env=None) -> list[str]:
    proc = subprocess.run([str(python), "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("PROBE|")]
    return line.split("|")[1:]


def test_source_tree_kernels_dir_only_for_our_own_sibling_folder(tmp_path):
    from ckf_dist import source_tree_kernels_dir

    tree = tmp_path / "tree"
    (tree / "ckf_dist").mkdir(parents=True)
    (tree / "kernels").mkdir()
    (tree / "kernels" / "__init__.py").write_text("")
    # some other "kernels" folder beside the package (PyPI's `kernels` in the same site-packages): not ours
    assert source_tree_kernels_dir([str(tree / "ckf_dist")]) is None
    (tree / "kernels" / "multi_lora_triton.py").write_text("")
    assert source_tree_kernels_dir([str(tree / "ckf_dist")]) == str(tree / "kernels")
    # an installed package has its own kernels subpackage: nothing to resolve
    (tree / "ckf_dist" / "kernels").mkdir()
    (tree / "ckf_dist" / "kernels" / "__init__.py").write_text("")
    assert source_tree_kernels_dir([str(tree / "ckf_dist")]) is None
    assert source_tree_kernels_dir([]) is None


def test_wheel_holds_kernels_as_a_subpackage_only(wheel_env):
    names = zipfile.ZipFile(wheel_env.wheel).namelist()
    assert "ckf_dist/kernels/__init__.py" in names and "ckf_dist/kernels/reference.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level `kernels` package would shadow PyPI's"


def test_wheel_install_imports_kernels_from_the_repo_folder_and_elsewhere(wheel_env, tmp_path):
    """From the repo folder the sources shadow the installed wheel (as in the Docker image); before the fix this
    raised ``ModuleNotFoundError: No module named 'ckf_dist.kernels'``."""
    pkg, kernels, top = _probe(wheel_env.python, REPO, wheel_env.env())
    assert pathlib.Path(pkg) == REPO / "ckf_dist" / "__init__.py"
    assert pathlib.Path(kernels) == REPO / "kernels" / "__init__.py"
    # anywhere else: the wheel's own ckf_dist.kernels, and no top-level `kernels` module
    pkg, kernels, top = _probe(wheel_env.python, tmp_path, wheel_env.env())
    assert pathlib.Path(pkg) == wheel_env.site / "ckf_dist" / "__init__.py"
    assert pathlib.Path(kernels) == wheel_env.site / "ckf_dist" / "kernels" / "__init__.py"
    assert top == "None"


def test_source_tree_without_any_install_imports_kernels(wheel_env, tmp_path):
    """What a Ray worker sees in ``--working-dir .`` when the cluster has no ckf_dist installed."""
    env = wheel_env.env()
    env["PYTHONPATH"] = ""
    pkg, kernels, _ = _probe(wheel_env.python, REPO, env)
    assert pathlib.Path(pkg) == REPO / "ckf_dist" / "__init__.py"
    assert pathlib.Path(kernels) == REPO / "kernels" / "__init__.py"


def test_editable_install_imports_kernels(tmp_path):
    for cwd in (REPO, tmp_path):
        pkg, kernels, _ = _probe(sys.executable, cwd)
        assert pathlib.Path(pkg) == REPO / "ckf_dist" / "__init__.py"
        assert pathlib.Path(kernels) == REPO / "kernels" / "__init__.py"


@pytest.mark.integration
def test_wheel_install_trains_from_the_repo_folder(wheel_env, tmp_path):
    """``python -m ckf_dist.train`` from the repo folder with the wheel installed (the Docker image's situation):
    2 Ray Train workers import ckf_dist.kernels (model/multi_lora.py) and train 2 steps."""
    args = ["training.max_steps=2", "data.num_users=40", "data.num_items=30", "data.interactions_per_user=10",
            "model.tiny.pretrain_steps=5", "training.eval_rows=8", "training.batch_size=4",
            f"data.path={tmp_path}/data", f"checkpoint.storage_path={tmp_path}/runs"]
    proc = subprocess.run([str(wheel_env.python), "-m", "ckf_dist.train", *args], cwd=REPO,
                          env=wheel_env.env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "done: step 2" in out, out[-3000:]
    assert (tmp_path / "runs" / "ckf-default" / "adapter" / "adapter.safetensors").exists()
