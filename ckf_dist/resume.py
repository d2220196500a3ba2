"""Which checkpoint a (re)started run resumes from, and how a checkpoint proves it is complete.

Every rank writes its checkpoint files into its own temp folder and Ray Train uploads each folder into the same
``<storage_path>/<run_name>/checkpoint_<UTC time>/`` folder. Last into its temp folder each rank writes
``complete_rank<r>.json``: the world size, the step, and the size and SHA-256 of every file it wrote. A
checkpoint is complete when the manifests of all ranks ``0..world_size-1`` are there and every file they list
has its size (checked from the storage listing, nothing downloaded) and its checksum (checked on the local copy
each rank reads anyway). A truncated shard, an upload cut short or a file damaged in storage fails the check.

On start, ``ray.train.get_checkpoint()`` is the latest checkpoint Ray Train registered (it registers one only
after every rank's upload returned). When that one is not complete, the run falls back to the newest complete
one before it in the run folder (``checkpoint_*`` folders sort by time; Ray Train keeps ``checkpoint.keep`` of
them, so ``keep >= 2`` leaves one to fall back to) and says which it skipped and why. Folders newer than the
registered latest (an upload that a killed driver never registered) are never used. A checkpoint written before
these manifests existed has none: the registered latest is then used as before (with a note), older ones are
not.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Callable, Optional

MANIFEST_RE = re.compile(r"^complete_rank(\d+)\.json$")
NO_MANIFEST = "no completeness manifest (complete_rank*.json)"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folder names: checkpoint_YYYY-MM-DD_HH-MM-SS.ffffff


class NoUsableCheckpoint(RuntimeError):
    """The run has checkpoints but none of them is complete."""


def manifest_name(rank: int) -> str:
    return f"complete_rank{rank}.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str, rank: int, world_size: int, step: int) -> None:
    """Writes ``complete_rank<rank>.json`` into ``folder`` (this rank's checkpoint files, before the upload)
    listing every file already there with its size and SHA-256. Call it after the last file is written."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    with open(os.path.join(folder, manifest_name(rank)), "w") as f:
        json.dump({"format": 1, "rank": rank, "world_size": world_size, "step": step, "files": files}, f, indent=1)


def _listing(fs, path: str) -> dict[str, int]:
    """{relative path: size} of every file under ``path`` on a pyarrow filesystem."""
    import pyarrow.fs as pafs

    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {f.path[len(path.rstrip("/")) + 1:]: f.size for f in found if f.type == pafs.FileType.File}


def _read_manifest(fs, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def storage_problem(fs, path: str) -> tuple[Optional[str], dict]:
    """(None or why the checkpoint at ``path`` is incomplete, {rank: manifest}) from the storage listing and the
    manifests alone. ``"no manifest"`` marks a checkpoint without any (pre-manifest, or a cut-short upload)."""
    sizes = _listing(fs, path)
    ranks = {int(m.group(1)): rel for rel in sizes if (m := MANIFEST_RE.match(rel))}
    if not ranks:
        return NO_MANIFEST, {}
    manifests = {}
    for r, rel in sorted(ranks.items()):
        try:
            manifests[r] = _read_manifest(fs, f"{path}/{rel}")
        except (OSError, ValueError) as exc:
            return f"{rel} unreadable ({exc})", {}
    world = manifests[min(manifests)]["world_size"]
    missing = [manifest_name(r) for r in range(world) if r not in manifests]
    if missing:
        return f"{', '.join(missing)} missing (world size {world}): an upload was cut short", {}
    for r, m in sorted(manifests.items()):
        for rel, meta in sorted(m["files"].items()):
            if rel not in sizes:
                return f"{rel} (rank {r}) missing", {}
            if sizes[rel] != meta["size"]:
                return f"{rel} (rank {r}) is {sizes[rel]} bytes, its manifest says {meta['size']}", {}
    return None, manifests


def local_problem(folder: str, manifests: dict, ranks: list[int]) -> Optional[str]:
    """None, or the first file of the given ranks' manifests whose local copy in ``folder`` differs from it."""
    for r in ranks:
        for rel, meta in sorted(manifests.get(r, {}).get("files", {}).items()):
            path = os.path.join(folder, rel)
            if not os.path.isfile(path) or os.path.getsize(path) != meta["size"]:
                return f"{rel} (rank {r}) missing or short in the local copy"
            if _sha256(path) != meta["sha256"]:
                return f"{rel} (rank {r}) fails its SHA-256 check"
    return None


def candidates(latest) -> list:
    """``latest`` (Ray Train's registered latest checkpoint) then the older ``checkpoint_*`` folders of the same
    run folder, newest first, as ``ray.train.Checkpoint`` objects."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, path = latest.filesystem, latest.path.rstrip("/")
    run_dir, name = path.rsplit("/", 1)
    found = fs.get_file_info(pafs.FileSelector(run_dir, recursive=False))
    older = sorted((f.base_name for f in found if f.type == pafs.FileType.Directory
                    and f.base_name.startswith(CHECKPOINT_PREFIX) and f.base_name < name), reverse=True)
    return [latest] + [Checkpoint(f"{run_dir}/{n}", filesystem=fs) for n in older]


def _name(checkpoint) -> str:
    return checkpoint.path.rstrip("/").rsplit("/", 1)[-1]


def open_resume_checkpoint(latest, rank: int, device, log: Callable[[str], None]):
    """(``as_directory`` context entered or None, local folder or None, [{"checkpoint", "why"} skipped]).

    Collective (every rank calls it): rank 0 checks the candidates' listings and broadcasts them; each rank then
    verifies the checksums of its own and rank 0's files in its local copy of the first candidate that passed,
    and the ranks move on together to the next one if any rank found a bad file. Raises ``NoUsableCheckpoint``
    when the run has checkpoints and none is complete."""
    import torch.distributed as dist

    if latest is None:
        return None, None, []
    dist_on = dist.is_initialized() and dist.get_world_size() > 1
    plan = [None]
    if rank == 0:
        plan[0] = []
        for i, ckpt in enumerate(candidates(latest)):
            try:
                why, manifests = storage_problem(ckpt.filesystem, ckpt.path)
            except OSError as exc:
                why, manifests = f"cannot be listed ({exc})", {}
            if why == NO_MANIFEST and i == 0:
                why = None  # Ray registered it after every upload returned; written before manifests existed
                log(f"checkpoint {_name(ckpt)} has no completeness manifest (written by an older version): "
                    "resuming from it unverified")
            plan[0].append((ckpt, why, manifests))
    if dist_on:
        dist.broadcast_object_list(plan, src=0, device=device)
    skipped = []
    for ckpt, why, manifests in plan[0]:
        if why is None:
            ctx = ckpt.as_directory()
            folder = ctx.__enter__()
            bad = local_problem(folder, manifests, sorted({0, rank}))
            verdicts = [bad]
            if dist_on:
                verdicts = [None] * dist.get_world_size()
                dist.all_gather_object(verdicts, bad)
            why = next((v for v in verdicts if v), None)
            if why is None:
                if skipped:
                    log(f"resuming from {_name(ckpt)}, the newest complete checkpoint; skipped "
                        + "; ".join(f"{s['checkpoint']} ({s['why']})" for s in skipped))
                return ctx, folder, skipped
            ctx.__exit__(None, None, None)
        skipped.append({"checkpoint": _name(ckpt), "why": why})
        log(f"skipping checkpoint {_name(ckpt)}: {why}")
    raise NoUsableCheckpoint(
        f"no complete checkpoint in {latest.path.rstrip('/').rsplit('/', 1)[0]}: "
        + "; ".join(f"{s['checkpoint']}: {s['why']}" for s in skipped)
        + " (start over with another checkpoint.run_name, or delete the run folder)")
