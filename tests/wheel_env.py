"""A Python environment with ckf_dist installed from its wheel (non-editable), the way the Docker image and a Ray
cluster node have it: used by tests/test_packaging.py and tests/test_job_submit.py.

The wheel is built from a copy of the sources (``pip wheel`` writes ``build/`` and ``*.egg-info`` next to
``setup.py``) and installed with ``pip install --target`` into a fresh folder. The interpreter is a new venv
whose ``.pth`` file points at this environment's site-packages for the dependencies (torch, ray, ...) and that
copies every other ``.pth`` file except the editable install's finder: in it, ``ckf_dist`` comes from the wheel
(or from the current folder when that holds the sources), never from the editable install.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class WheelEnv:
    wheel: pathlib.Path
    site: pathlib.Path  # the --target folder holding the installed wheel
    python: pathlib.Path  # the venv interpreter without the editable install
    bin_dir: pathlib.Path

    def env(self, **extra) -> dict:
        """Environment for subprocesses of this install: the wheel first on sys.path, its venv first on PATH."""
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env["PYTHONPATH"] = str(self.site)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env.update({k: str(v) for k, v in extra.items()})
        return env


def build_wheel_env(root: pathlib.Path) -> WheelEnv:
    src = root / "src"
    src.mkdir(parents=True)
    shutil.copy2(REPO / "setup.py", src / "setup.py")
    for name in ("ckf_dist", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "wheel"), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = (root / "wheel").glob("ckf_dist-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"),
                    str(wheel)], check=True, capture_output=True, text=True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = pathlib.Path(sysconfig.get_paths()["purelib"])
    (venv_site,) = glob.glob(str(venv / "lib" / "python*" / "site-packages"))
    pathlib.Path(venv_site, "00_ckf_deps.pth").write_text(f"{purelib}\n")
    for pth in purelib.glob("*.pth"):
        if not pth.name.startswith("__editable__"):
            shutil.copy2(pth, pathlib.Path(venv_site, pth.name))
    return WheelEnv(wheel=wheel, site=root / "site", python=venv / "bin" / "python", bin_dir=venv / "bin")
