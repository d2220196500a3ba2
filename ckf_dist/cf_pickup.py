"""Live pickup of new CF embedding versions inside a running training job.

Every ``cf.refresh_check_every_steps`` steps rank 0 reads the store's ``latest`` pointer and broadcasts it;
if it names a new version, every rank loads it, the ranks agree (all-reduce) that all loads succeeded, and
all swap their frozen tables before the same step. A corrupt or incomplete version, or one that was not
trained on the training run's data set (its binding does not match ``data_manifest``, or it has none:
``ckf_dist.cf.binding``), is rejected with a log line and training continues on the current one. The pause is
the load itself (tables are small: d is 8-64).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ckf_dist.config import Config, resolve_data_path, resolve_embeddings_path


class CFVersionFollower:
    """data_manifest: the training data set's manifest dict (``ckf_dist.data.streaming.read_manifest(cfg)``);
    a new version must be bound to it. None skips that check (the behaviour before versions were bound)."""

    def __init__(self, cfg: Config, current: str, log: Callable[[str], None], data_manifest: Optional[dict] = None):
        self.cfg = cfg
        self.current = current
        self.log = log
        self.data_manifest = data_manifest
        self.every = cfg.cf.refresh_check_every_steps
        self.rejected: set[str] = set()

    def _broadcast(self, value: Optional[str]) -> Optional[str]:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def maybe_swap(self, step: int, model) -> Optional[str]:
        """Returns the new version id when the tables were swapped before ``step``, else None."""
        if not self.every or step == 0 or step % self.every:
            return None
        from ckf_dist.cf.binding import check_version_for_data
        from ckf_dist.cf.store import latest_version, load_version

        root = resolve_embeddings_path(self.cfg)
        candidate = None
        if dist.get_rank() == 0:
            try:
                candidate = latest_version(root, s3=self.cfg.data.s3)
            except Exception as exc:  # a store hiccup must not kill training
                self.log(f"CF pickup: cannot read the latest pointer under {root}: {exc}")
        candidate = self._broadcast(candidate)
        if not candidate or candidate == self.current or candidate in self.rejected:
            return None
        t0 = time.time()
        ok, error = 1, ""
        try:
            ev = load_version(root, candidate, s3=self.cfg.data.s3)
            if self.data_manifest is not None:  # DataMismatchError: trained on another data set, or unbound
                check_version_for_data(ev, self.data_manifest, root=root, data_path=resolve_data_path(self.cfg))
            users, items = ev.dense_tables()
            if ev.dim != self.cfg.cf.dim:
                raise ValueError(f"dimension {ev.dim} != cf.dim {self.cfg.cf.dim}")
        except Exception as exc:  # CorruptVersionError, DataMismatchError, missing files, wrong shapes
            ok, error = 0, str(exc)
        flag = torch.tensor([ok], dtype=torch.int32, device=model.user_table.device)  # NCCL needs device tensors
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not bool(flag.item()):
            self.rejected.add(candidate)
            self.log(f"CF pickup: rejected embedding version {candidate} at step {step}; staying on "
                     f"{self.current} ({error or 'failed to load on another rank'})")
            return None
        model.set_cf_tables(torch.from_numpy(users), torch.from_numpy(items))
        self.log(f"CF pickup: step {step}: swapped embeddings {self.current} -> {candidate} "
                 f"({users.shape[0] - 1} users, {items.shape[0] - 1} items) in {time.time() - t0:.2f}s")
        self.current = candidate
        return candidate


def table_checksum(table: torch.Tensor) -> str:
    """sha256 (16 hex digits) of a CF table's float32 values: the swap audit records it for the tables the
    model really holds after a swap, so a swap that did not reach the model shows."""
    import hashlib

    data = table.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
