"""Scale-out on a Ray cluster (the optional extra `ray`; `--ray ADDRESS`, `CLIPDEDUP_RAY`).

The driver (the `clip-image-deduper` process) keeps everything that decides what happens: the scan,
the update plan, the exact-copy pre-pass, the DB lock, the one `.npy` writer, grouping, keeping and
moving. The cluster runs the same stage functions on other processes and machines:

- encoding (`clipdedup.cluster.encode`, `clipdedup.cluster.actors`): one actor per GPU (or per
  `actor_cpus` CPUs), alive for the run, that loads the model, fits it before its decoder starts and
  runs one decode -> encode pipeline over its shard of the images with this project's decoder
  registry and `load_encoder`'s model; the vectors and the per-file failure reasons stream back to
  the driver, whose writer puts them in the DB exactly as a local run does;
- matching (`clipdedup.cluster.match`, with `--ray-match`): tiles of the upper triangle as Ray
  tasks that each read two row blocks from the DB's snapshot on shared storage
  (`clipdedup.cluster.rows`) and run `find_pairs` on them; the driver merges the pairs.

Ray is imported only when a run needs it: `connect()` raises a `UserError` with the install line
when the extra is missing. What runs where, and why the vectors come back to the driver instead of
being written by the workers, is in docs/cluster.md.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from clipdedup.cluster import encode as ray_encode
from clipdedup.cluster import match as ray_match
from clipdedup.cluster.session import INSTALL_HINT, RaySession, check_address, import_ray, task_error
from clipdedup.errors import UserError

__all__ = [
    "INSTALL_HINT",
    "RayCluster",
    "RaySession",
    "check_address",
    "import_ray",
    "open_cluster",
    "task_error",
]


class RayCluster(RaySession):
    """A `RaySession` that encodes and matches: what `update_db` and the pipeline call."""

    def load_encoder(self, model_id: str, *, device: str | None = None, log: Any = None) -> Any:
        """See `clipdedup.cluster.encode.remote_encoder` (`log` is not used: workers log nothing)."""
        return ray_encode.remote_encoder(self, model_id, device)

    def find_pairs(self, x: np.ndarray, threshold: float, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        """See `clipdedup.cluster.match.find_pairs_ray`."""
        return ray_match.find_pairs_ray(self, x, threshold, **kw)


def open_cluster(address: str | None, match: bool = False) -> RayCluster | None:
    """A `RayCluster` for `address` (`--ray`; not connected yet), or None without one."""
    if not address:
        if match:
            raise UserError("--ray-match needs --ray ADDRESS (or CLIPDEDUP_RAY)")
        return None
    cluster = RayCluster(address, match=match)
    if importlib.util.find_spec("ray") is None:  # say it at the start, not after the scan
        raise UserError(INSTALL_HINT)
    return cluster
