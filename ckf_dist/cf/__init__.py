"""CF knowledge extraction (CKEM): MF / LightGCN training, the versioned embedding store, the refresh job.

Public API (see store.py for the publication guarantees)::

    from ckf_dist.cf import (publish_version, latest_version, list_versions, load_version,
                             EmbeddingVersion, CorruptVersionError)
    from ckf_dist.cf import load_version_for_data, DataMismatchError  # versions bound to a data set (binding.py)
    from ckf_dist.cf_refresh import refresh_once, ensure_embeddings
"""
from ckf_dist.cf.binding import DataMismatchError, load_version_for_data  # noqa: F401
from ckf_dist.cf.store import (  # noqa: F401
    CorruptVersionError,
    EmbeddingVersion,
    latest_version,
    list_versions,
    load_version,
    publish_version,
)
