"""Every command in the docs' shell code blocks parses against the real CLIs (issue 13): a README command with a
misspelt key, a removed option or a missing file fails here, not in a user's terminal.

The blocks are the ```bash blocks of README.md, cluster/README.md and kernels/README.md, plus the entrypoints of
the KubeRay manifests. Each block must pass ``bash -n``; each command in it is split the way the shell splits it
(``&&``, ``|``, ``;``, ``&``, comments, redirections) and checked by its program:

- ``python -m ckf_dist.<entry point>``: that entry point's own ``parse_args`` (the config keys, files and options
  it would load; nothing runs); ``python <script>``: the script's ``parse_args`` plus its config overrides.
- ``ray ...``: Ray's click command tree (``ray.scripts.scripts.cli``) parses the whole line; the entrypoint after
  ``ray job submit ... --`` is checked as a command of its own.
- ``tensorboard``: TensorBoard's own flag parser (``tensorboard.program.TensorBoard.configure``).
- ``pip install``: pip's own option parser; ``.[extra,...]`` names only extras setup.py defines; every other
  requirement is a valid PEP 508 requirement.
- ``kubectl``, ``helm``, ``docker``, ``aws``, ``openssl``, ``base64``: not installed on this machine or in CI, so only
  what they read is checked: every file they name exists, every ``kubectl``/``docker`` subcommand is one they have.
- A program the test does not know fails it: a new kind of command in the docs needs a check here.

Paths under ``/etc/ckf/`` are the ``ckf-config`` ConfigMap, which holds the repo's ``configs/`` file of that name
(tests/test_cluster_manifests.py checks the mounts); ``~`` is this user's home.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md", "cluster/README.md", "kernels/README.md"]
MANIFESTS = sorted((REPO / "cluster").glob("*.yaml"))
ENTRY_POINTS = {"ckf_dist.train", "ckf_dist.data.prepare", "ckf_dist.cf_refresh", "ckf_dist.evaluate", "ckf_dist.profile"}
OPERATORS = {"&&", "||", "|", ";", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>&1"}
FILE_ONLY = {"kubectl", "helm", "docker", "aws", "openssl", "base64"}
KUBECTL_VERBS = {"apply", "create", "delete", "get", "logs", "port-forward", "describe", "rollout"}


def shell_blocks() -> list[tuple[str, str]]:
    """(``file:line``, text) of every ```bash block in the docs."""
    out = []
    for name in DOCS:
        text = (REPO / name).read_text()
        for m in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
            out.append((f"{name}:{text[: m.start()].count(chr(10)) + 1}", m.group(1)))
    return out


def manifest_entrypoints() -> list[tuple[str, str]]:
    """(``file``, command) of every RayJob/RayCronJob entrypoint in cluster/."""
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec") or {}
            for job in (spec, spec.get("jobTemplate", {})):  # RayJob, RayCronJob
                if isinstance(job, dict) and job.get("entrypoint"):
                    out.append((path.name, job["entrypoint"]))
    return out


def split_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell text: continuation lines joined, comments and redirections dropped, leading
    ``VAR=value`` assignments dropped, split at ``&&``, ``||``, ``|``, ``;`` and ``&``."""
    tokens = []
    for line in text.replace("\\\n", " ").splitlines():  # a newline ends a command like ";"
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens += list(lexer) + [";"]
    commands, current, skip_next = [], [], False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token in OPERATORS:
            commands.append(current)
            current = []
        elif token in REDIRECTS:
            skip_next = token != "2>&1"
        else:
            current.append(token)
    commands.append(current)
    out = []
    for cmd in commands:
        while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):
            cmd = cmd[1:]
        if cmd:
            out.append(cmd)
    return out


def local_path(arg: str) -> pathlib.Path:
    """A path as a command in the docs names it, on this machine (see the module docstring)."""
    if arg.startswith("/etc/ckf/"):
        return REPO / "configs" / arg[len("/etc/ckf/"):]
    path = pathlib.Path(os.path.expanduser(arg))
    return path if path.is_absolute() else REPO / path


def _config_args(args: list[str]) -> list[str]:
    """The command's arguments with ``--config FILE`` resolved to this machine's path (and required to exist)."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg in ("--config", "-c"):
            path = local_path(out[i + 1])
            assert path.is_file(), f"--config {out[i + 1]}: no such file ({path})"
            out[i + 1] = str(path)
    return out


def check_entry_point(module: str, args: list[str]) -> None:
    from ckf_dist.config import wants_help

    assert module in ENTRY_POINTS, f"python -m {module}: not an entry point of ckf_dist"
    if wants_help(args):
        return  # tests/test_cli.py runs every --help
    importlib.import_module(module).parse_args(_config_args(args))


def check_script(script: str, args: list[str]) -> None:
    from ckf_dist.config import load_config

    path = REPO / script
    assert path.is_file(), f"python {script}: no such file"
    spec = importlib.util.spec_from_file_location(f"doc_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "parse_args"), f"{script} has no parse_args(argv) to check its command line with"
    parsed = module.parse_args(args)
    load_config(getattr(parsed[0], "overrides", []))  # its trailing key=value pairs are config overrides


def check_python(cmd: list[str]) -> None:
    args = cmd[1:]
    if args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module == "venv":
            assert len(rest) == 1, cmd
        elif module == "pytest":
            pass  # the README's test command is the one .ci/run runs
        else:
            check_entry_point(module, rest)
    else:
        check_script(args[0], args[1:])


def check_ray(cmd: list[str]) -> None:
    """Ray's own click tree parses the line (an unknown option or subcommand raises)."""
    import click
    from ray.scripts.scripts import cli

    command, name, args, parent = cli, "ray", cmd[1:], None
    while True:
        ctx = command.make_context(name, list(args), parent=parent)
        if not isinstance(command, click.Group):
            break
        rest = [*(getattr(ctx, "_protected_args", None) or []), *ctx.args]
        sub_name, sub, args = command.resolve_command(ctx, rest)
        assert sub is not None, f"ray: no command {rest[:1]}"
        command, name, parent = sub, sub_name, ctx
    entrypoint = ctx.params.get("entrypoint")
    if entrypoint:
        check_command(list(entrypoint))
    if name == "submit" and "--working-dir" in cmd:
        assert local_path(cmd[cmd.index("--working-dir") + 1]).is_dir()


def check_pip(cmd: list[str]) -> None:
    from importlib.metadata import metadata

    from packaging.requirements import Requirement
    from pip._internal.commands import create_command

    assert cmd[1] == "install", cmd
    options, reqs = create_command("install").parse_args(cmd[2:])
    extras = set(metadata("ckf_dist").get_all("Provides-Extra") or [])
    for req in reqs + list(options.editables):
        if req.startswith("."):
            m = re.fullmatch(r"\.(?:\[([^\]]*)\])?", req)
            assert m, f"pip install {req}: not the project folder"
            unknown = {e.strip() for e in (m.group(1) or "").split(",") if e.strip()} - extras
            assert not unknown, f"pip install {req}: setup.py defines no extra {sorted(unknown)} ({sorted(extras)})"
        else:
            Requirement(req)


def check_file_only(cmd: list[str]) -> None:
    program, args = cmd[0], cmd[1:]
    if program == "kubectl":
        assert args and args[0] in KUBECTL_VERBS, f"kubectl {args[:1]}: not a kubectl command used here"
    if program == "docker":
        assert args and args[0] in {"build", "push", "run"}, cmd
    for i, arg in enumerate(args):
        value = None
        if arg in ("-f", "--file") and i + 1 < len(args) and args[0] != "logs":  # kubectl logs -f: follow
            value = args[i + 1]
        elif arg.startswith("--from-file="):
            value = arg.split("=", 1)[1].split("=")[-1]
        if value is not None and value != "-" and "://" not in value:
            assert local_path(value).exists(), f"{' '.join(cmd)}: {value} does not exist"
    if program == "aws" and args[:2] == ["s3", "sync"] and args[2].startswith("../shared/"):
        assert args[2].startswith("../shared/data/"), cmd


def check_bash(cmd: list[str]) -> None:
    """``bash SCRIPT ...``: the script is the repo's and parses (``bash -n``)."""
    path = REPO / cmd[1]
    assert path.is_file(), f"bash {cmd[1]}: no such file"
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def check_tensorboard(cmd: list[str]) -> None:
    """TensorBoard's own flag parser reads the line (a bad flag exits, a missing --logdir raises FlagsError)."""
    from tensorboard import program

    program.TensorBoard().configure(argv=cmd)


def check_command(cmd: list[str]) -> None:
    program = os.path.basename(cmd[0])
    if program in ("python", "python3"):
        check_python(cmd)
    elif program == "tensorboard":
        check_tensorboard(cmd)
    elif program == "bash":
        check_bash(cmd)
    elif program == "ray":
        check_ray(cmd)
    elif program == "pip":
        check_pip(cmd)
    elif program in FILE_ONLY:
        check_file_only(cmd)
    elif program in (".", "source"):
        assert cmd[1] == ".venv/bin/activate", cmd
    elif program == "export":
        assert all("=" in a for a in cmd[1:]), cmd
    else:
        raise AssertionError(f"no check for {program!r} (add one to tests/test_readme_commands.py): {' '.join(cmd)}")


BLOCKS = shell_blocks()


def test_the_docs_have_the_blocks_this_test_checks():
    where = [w.split(":")[0] for w, _ in BLOCKS]
    assert where.count("README.md") >= 3 and where.count("cluster/README.md") >= 5, where
    assert {"rayjob-train.yaml", "raycronjob-cf-refresh.yaml"} <= {f for f, _ in manifest_entrypoints()}


@pytest.mark.parametrize("where,block", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_every_block_is_valid_shell_and_every_command_parses(where, block):
    syntax = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{where}: {syntax.stderr}"
    for cmd in split_commands(block):
        try:
            check_command(cmd)
        except SystemExit as exc:  # argparse's error exit
            raise AssertionError(f"{where}: {' '.join(cmd)}: exit {exc.code}") from exc
        except Exception as exc:  # noqa: BLE001 - name the command that failed
            raise AssertionError(f"{where}: {' '.join(cmd)}: {type(exc).__name__}: {exc}") from exc


@pytest.mark.parametrize("where,entrypoint", manifest_entrypoints(), ids=[w for w, _ in manifest_entrypoints()])
def test_manifest_entrypoints_parse(where, entrypoint):
    for cmd in split_commands(entrypoint):
        check_command(cmd)


@pytest.mark.parametrize("bad", [
    "python -m ckf_dist.train training.max_stepz=3",                       # misspelt key
    "python -m ckf_dist.train --config configs/nope.yaml",                 # missing file
    "python -m ckf_dist.cf_refresh --every soon",                          # bad interval
    "python -m ckf_dist.evaluate --basline cf-only",                       # misspelt option (a config arg then)
    "ray job submit --adress http://127.0.0.1:8265 -- python -m ckf_dist.train",   # misspelt ray option
    "ray job submit -- python -m ckf_dist.train training.lr=fast",         # bad value inside the entrypoint
    "ray jobs submit -- python -m ckf_dist.train",                         # no such ray command
    "pip install torch==2.13.0 -e '.[tests]'",                            # no such extra
    "kubectl apply -f cluster/rayjob.yaml",                                # no such manifest
    "python benchmarks/bench_quality.py --minutez 3",                      # misspelt script option
    "make all",                                                            # a program nobody checks
    "tensorboard --log-dir ~/ckf_runs/ckf-default/tensorboard",            # misspelt tensorboard flag
    "tensorboard",                                                         # no --logdir
])
def test_the_checks_reject_what_they_are_for(bad):
    import click
    from tensorboard.plugins.base_plugin import FlagsError

    # ConfigError is a ValueError; click.UsageError is what Ray's CLI raises for a bad option or command
    with pytest.raises((AssertionError, SystemExit, ValueError, click.UsageError, FlagsError)):
        for cmd in split_commands(bad):
            check_command(cmd)


def test_split_commands_follows_the_shell():
    text = "A=1 python -m x a=b && echo 'a # b' | tee f > /dev/null # comment\nray stop; y \\\n  --flag &"
    assert split_commands(text) == [["python", "-m", "x", "a=b"], ["echo", "a # b"], ["tee", "f"], ["ray", "stop"],
                                    ["y", "--flag"]]
