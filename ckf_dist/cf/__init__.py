"""CF knowledge extraction (CKEM): MF / LightGCN training, the versioned embedding store, the refresh job.

Public API (see store.py for the publication guarantees)::

    from ckf_dist.cf import (publish_version, latest_version, list_versions, load_version,
                             EmbeddingVersion, CorruptVersionError)
    from ckf_dist.cf_refresh import refresh_once
"""
from ckf_dist.cf.store import (  # noqa: F401
    CorruptVersionError,
    EmbeddingVersion,
    latest_version,
    list_versions,
    load_version,
    publish_version,
)
