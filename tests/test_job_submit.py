"""The README's "On a Ray cluster" recipe end to end on a local cluster with token authentication, on a fresh
machine (an empty HOME: no ``~/.ray/auth_token`` yet): ``ray get-auth-token --generate``, ``RAY_AUTH_MODE=token``,
``ray start --head``, ``ray job submit --working-dir . -- python -m ckf_dist.train ...`` to SUCCEEDED; a submit
without the token, or with a wrong one, is refused.

The cluster runs a Python where ckf_dist is installed from its wheel (tests/wheel_env.py: the image of a real
cluster), so the job's driver and its Ray Train workers import ckf_dist from the uploaded working directory, whose
``kernels/`` is not mapped by any install (``ckf_dist.kernels`` used to be missing there).

Ports are free ones and Ray's temp dir is private. Teardown stops this cluster only: ``ray start --block`` runs in
its own session and is stopped by its process group. ``ray stop`` (the README's last step) would stop every Ray on
the machine, other users' included.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.wheel_env import REPO, build_wheel_env

pytestmark = pytest.mark.integration

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # this environment's `ray` CLI (the client side)
TRAIN_ARGS = ["training.max_steps=2", "data.num_users=40", "data.num_items=30", "data.interactions_per_user=10",
              "model.tiny.pretrain_steps=5", "training.eval_rows=8", "training.batch_size=4"]


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_pids(sid: int) -> list[int]:
    """The processes of the session that ``ray start --block`` leads (started with start_new_session=True)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def readme_recipe() -> list[str]:
    """The shell commands of the README's "On a Ray cluster" code block (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## On a Ray cluster", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [" ".join(c.split("#")[0].split()) for c in block.replace("\\\n", " ").splitlines() if c.strip()]


class Cluster:
    def __init__(self, root: pathlib.Path, wheel_env):
        self.home = root / "home"  # a fresh machine: no ~/.ray/auth_token
        self.home.mkdir()
        self.data = root / "work"
        # AF_UNIX socket paths must stay short: a private temp dir directly under /tmp
        self.temp_dir = tempfile.mkdtemp(prefix="ckfray")
        port, dash, client, agent_http, agent_grpc, metrics, env_agent = _free_ports(7)
        self.dashboard = f"http://127.0.0.1:{dash}"
        extra = {"HOME": self.home, "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": 1, "RAY_USAGE_STATS_ENABLED": 0}
        cache = pathlib.Path.home() / ".cache" / "torch_extensions"
        if cache.exists():  # DeepSpeed's JIT-built op (about 20 s to build in a fresh HOME)
            extra["TORCH_EXTENSIONS_DIR"] = cache
        self.server_env = wheel_env.env(**extra)
        self.client_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.client_env.update(HOME=str(self.home), RAY_AUTH_MODE="token")
        self.start_cmd = [str(wheel_env.python), "-m", "ray.scripts.scripts", "start", "--head", "--block",
                          "--num-cpus", "4", "--port", str(port), "--dashboard-port", str(dash),
                          "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
                          "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
                          "--runtime-env-agent-port", str(env_agent), "--temp-dir", self.temp_dir,
                          "--disable-usage-stats"]
        self.proc = None

    def ray(self, *args, env=None, timeout=600):
        return subprocess.run(RAY + list(args), env=env or self.client_env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> None:
        gen = self.ray("get-auth-token", "--generate")
        assert gen.returncode == 0, gen.stderr[-2000:]
        assert (self.home / ".ray" / "auth_token").exists()
        self.log = open(self.home / "ray_start.log", "w")
        self.proc = subprocess.Popen(self.start_cmd, env=self.server_env, cwd=self.home, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("ray start exited: " + (self.home / "ray_start.log").read_text()[-3000:])
            if self.ray("job", "list", "--address", self.dashboard, timeout=60).returncode == 0:
                return
            time.sleep(2)
        raise AssertionError("the local cluster's job server did not come up in 180 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ray start --block drains its node (up to 30 s), then stops it
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            for pid in _session_pids(self.proc.pid):  # whatever of this cluster is left (workers have own groups)
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    c = Cluster(root, build_wheel_env(root / "wheel_env"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_readme_recipe_is_the_one_tested():
    cmds = readme_recipe()
    want = ["ray get-auth-token --generate", "export RAY_AUTH_MODE=token", "ray start --head",
            "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m ckf_dist.train", "ray stop"]
    at = [next((i for i, c in enumerate(cmds) if c.startswith(w) or (w in c and w.startswith("ray job"))), None)
          for w in want]
    assert None not in at and at == sorted(at), (cmds, at)


def test_job_with_token_trains_from_the_working_dir(cluster):
    """``ray job submit --working-dir .`` with token auth: SUCCEEDED, 2 training steps, the job's console short."""
    sid = f"ckf-job-{os.getpid()}"
    proc = cluster.ray("job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--submission-id", sid,
                       "--", "python", "-m", "ckf_dist.train", *TRAIN_ARGS, f"data.path={cluster.data}/data",
                       f"checkpoint.storage_path={cluster.data}/runs", timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert f"Job '{sid}' succeeded" in out, out[-3000:]
    assert "done: step 2" in out and "[rank 0] step 2/2" in out, out[-3000:]
    assert "No module named" not in out
    status = cluster.ray("job", "status", "--address", cluster.dashboard, sid)
    assert status.returncode == 0 and f"'{sid}' succeeded" in status.stdout + status.stderr
    assert (cluster.data / "runs" / "ckf-default" / "adapter" / "adapter.safetensors").exists()


def test_submit_without_the_token_is_refused(cluster, tmp_path):
    env = {k: v for k, v in cluster.client_env.items() if k != "RAY_AUTH_MODE"}
    env["HOME"] = str(tmp_path)  # no token anywhere, auth mode unset: the request goes out without a token
    proc = cluster.ray("job", "submit", "--address", cluster.dashboard, "--", "echo", "hi", env=env, timeout=120)
    assert proc.returncode != 0
    assert "401" in proc.stdout + proc.stderr or "Unauthorized" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    wrong = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32)
    proc = cluster.ray("job", "submit", "--address", cluster.dashboard, "--", "echo", "hi", env=wrong, timeout=120)
    assert proc.returncode != 0
    assert "403" in proc.stdout + proc.stderr or "Forbidden" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    jobs = cluster.ray("job", "list", "--address", cluster.dashboard)
    assert "echo hi" not in jobs.stdout
