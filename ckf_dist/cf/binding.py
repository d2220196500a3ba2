"""Binds each CF embedding version to the prepared data set it was trained on, and checks that binding.

A prepared data set is identified by its ``_manifest.json`` (``ckf_dist.data.prepare`` writes it last; every
rebuild writes a new one, with a new ``created_at``): its data-set ids are contiguous indices assigned at
preparation and its split depends on the data config, so an embedding version is only meaningful for - and
only free of held-out interactions on - the data set whose manifest it was trained on. The refresh job
records, in ``manifest["binding"]`` of each version it publishes::

    data_path             where the data set was read (messages only: a copied data set still matches)
    data_manifest_sha256  data_manifest_hash(the data set's manifest); None for a data set without one
    id_maps_sha256        id_maps_hash(raw user ids by data-set id, raw item ids by data-set id)
    id_maps_source        where the raw ids came from (users/items tables, or identity without them)
    files_sha256          names + sizes of the interaction shards read (as in data_snapshot)
    num_users, num_items  the data set's id ranges
    summary               created_at, counts and data_config (no s3/path): to say *what* differs

and stores the raw id of every table row next to the tables (``EmbeddingVersion.user_raw_ids``), which is
what a warm start maps rows by. A version without a binding (published before bindings existed, or by hand)
is *unbound*: it is refused for use with a data set, never silently used.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np

from ckf_dist.cf.store import EmbeddingVersion, load_version
from ckf_dist.config import S3Config

SUMMARY_KEYS = ("created_at", "source", "num_users", "num_items", "num_interactions", "interactions_per_split")
CONFIG_SKIP = ("path", "s3", "prepare_if_missing")  # settings that do not change the data
MAX_SHOWN = 6


class DataMismatchError(ValueError):
    """A CF embedding version used with a data set it was not trained on (or that it cannot be checked
    against); the message names the version, the data set and what differs."""


def data_manifest_hash(manifest: dict) -> str:
    """sha256 of a data set's manifest dict, serialised as ``io.write_json`` writes it (so for a manifest
    written by ``prepare`` it equals the sha256 of ``_manifest.json`` itself). The dict is normalised through
    a JSON round trip first, so the dict ``prepare`` returns and the one read back hash the same."""
    normal = json.loads(json.dumps(manifest))
    return hashlib.sha256(json.dumps(normal, indent=2, sort_keys=True).encode("utf-8")).hexdigest()


def id_maps_hash(user_raw_ids: np.ndarray, item_raw_ids: np.ndarray) -> str:
    """sha256 of the id maps: user_raw_ids [U] / item_raw_ids [I] = the raw id of each data-set id, in id order."""
    text = json.dumps([[str(x) for x in user_raw_ids], [str(x) for x in item_raw_ids]])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _summary(manifest: Optional[dict]) -> dict:
    if not manifest:
        return {}
    out = {k: manifest.get(k) for k in SUMMARY_KEYS if k in manifest}
    config = manifest.get("data_config")
    if isinstance(config, dict):
        out["data_config"] = {k: v for k, v in config.items() if k not in CONFIG_SKIP}
    return json.loads(json.dumps(out))


def make_binding(data_path: str, data_manifest: Optional[dict], user_raw_ids: np.ndarray, item_raw_ids: np.ndarray,
                 *, id_maps_source: str, files_sha256: Optional[str] = None) -> dict:
    """The binding to record in a version trained on this data set (``publish_version(binding=...)``).

    user_raw_ids [num_users] / item_raw_ids [num_items]: the data set's whole id maps (raw id of each data-set
    id), not only the rows the version covers. data_manifest: the data set's manifest dict, None when it has none.
    """
    return {
        "data_path": data_path,
        "data_manifest_sha256": data_manifest_hash(data_manifest) if data_manifest else None,
        "id_maps_sha256": id_maps_hash(user_raw_ids, item_raw_ids),
        "id_maps_source": id_maps_source,
        "files_sha256": files_sha256,
        "num_users": int(len(user_raw_ids)),
        "num_items": int(len(item_raw_ids)),
        "summary": _summary(data_manifest),
    }


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:  # one level: data_config.x, interactions_per_split.valid
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def describe_differences(old: dict, new: dict) -> str:
    """'data_config.test_per_user: 1 -> 3, ...' between two summaries (data settings first), or ''."""
    a, b = _flat(old or {}), _flat(new or {})
    keys = sorted(set(a) | set(b), key=lambda k: (not k.startswith("data_config."), k == "created_at", k))
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}".replace("'", "") for k in keys if a.get(k) != b.get(k)]
    more = f" (+{len(diffs) - MAX_SHOWN} more)" if len(diffs) > MAX_SHOWN else ""
    return ", ".join(diffs[:MAX_SHOWN]) + more


def _mismatch(bound: dict, want_hash: Optional[str], want_summary: dict) -> str:
    got = bound.get("data_manifest_sha256")
    what = describe_differences(bound.get("summary") or {}, want_summary)
    return (f"it was trained on another data set (manifest hash {str(got)[:12]} != {str(want_hash)[:12]}"
            + (f"; differs (trained on -> this one): {what}" if what else "") + ")")


UNBOUND = ("it has no data-set binding (published without the data manifest hash and raw ids of the data set "
           "it was trained on, e.g. before bindings were recorded), so it cannot be checked against this data set")


def binding_problem(ev: EmbeddingVersion, data_manifest: dict) -> Optional[str]:
    """None when ``ev`` was trained on the data set whose manifest dict is ``data_manifest``, else why not."""
    bound = ev.binding
    if bound is None:
        return UNBOUND
    got = bound.get("data_manifest_sha256")
    if got is None:
        return (f"it was trained on a data set without a manifest ({bound.get('data_path')}), so it cannot be "
                "checked against this data set")
    want = data_manifest_hash(data_manifest)
    return None if got == want else _mismatch(bound, want, _summary(data_manifest))


def check_version_for_data(ev: EmbeddingVersion, data_manifest: dict, *, root: str = "",
                           data_path: str = "") -> None:
    """Raises DataMismatchError naming the version, the data set and what differs unless ``ev`` is bound to
    the data set of ``data_manifest`` (a manifest dict, e.g. ``ckf_dist.data.streaming.read_manifest(cfg)``)."""
    problem = binding_problem(ev, data_manifest)
    if problem is None:
        return
    where = f" under {root}" if root else ""
    data_path = data_path or (data_manifest.get("data_config") or {}).get("path") or "(path unknown)"
    raise DataMismatchError(f"CF embedding version {ev.version}{where} cannot be used with the data set at "
                            f"{data_path}: {problem}. Train embeddings for this data set (python -m "
                            f"ckf_dist.cf_refresh data.path={data_path}) and use that version.")


def load_version_for_data(root: str, version: Optional[str], data_manifest: dict, s3: Optional[S3Config] = None,
                          *, data_path: str = "") -> EmbeddingVersion:
    """``store.load_version`` (None = latest) + ``check_version_for_data``: a verified version bound to this
    data set. Raises FileNotFoundError / CorruptVersionError as load_version, DataMismatchError (a ValueError)
    when the version was trained on another data set or is unbound."""
    ev = load_version(root, version, s3=s3)
    check_version_for_data(ev, data_manifest, root=root, data_path=data_path)
    return ev


def warm_start_problem(previous: EmbeddingVersion, binding: dict) -> Optional[str]:
    """None when ``previous`` may warm-start a refresh of the data set described by ``binding``, else why not.

    Only a version of the same data set qualifies (same manifest hash; for data sets without a manifest, the
    same id maps and interaction shards): a version of another data set has its rows mapped by raw id fine,
    but may have trained on interactions that this data set holds out (valid/test), which would leak them.
    """
    bound = previous.binding
    if bound is None:
        return "it has no data-set binding (no raw ids to map its rows by)"
    want = binding.get("data_manifest_sha256")
    if want is not None or bound.get("data_manifest_sha256") is not None:
        if bound.get("data_manifest_sha256") == want:
            return None
        return (_mismatch(bound, want, binding.get("summary") or {})
                + ": its rows may encode interactions this data set holds out")
    same = (bound.get("id_maps_sha256") == binding.get("id_maps_sha256")
            and bound.get("files_sha256") == binding.get("files_sha256"))
    return None if same else ("it was trained on another data set without a manifest (id maps or interaction "
                              "shards differ)")
