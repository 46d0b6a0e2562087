"""A Ray connection: the address forms `--ray` takes, connecting on first use, the cluster's
resources, and the user's error inside a failed Ray task. Ray is imported only when a run needs
it (`import_ray`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from clipdedup.errors import UserError

INSTALL_HINT = (
    "--ray needs Ray, which is not installed: pip install 'clip-image-deduper[ray]' (or 'ray[data]')"
)
ACTOR_CPUS_ENV = "CLIPDEDUP_RAY_ACTOR_CPUS"  # CPUs per CPU encoder actor (default 1)
BLOCK_ROWS_ENV = "CLIPDEDUP_RAY_BLOCK_ROWS"  # rows per block of a matching tile (default: see block_rows_for)


def block_rows_for(n: int, gpu: bool) -> int:
    """Rows per block for matching n rows: about 48 blocks (1,176 tiles), at least 8,192 rows, at
    most 2^21 on a GPU (two float32 blocks of 10.7 GB in a task's RAM at D = 1280, 5.4 GB each in
    float16 on the device) or 2^18 on a CPU. Fewer, larger tiles read fewer bytes from the shared
    snapshot: a run reads about N^2 / (2 * block) rows (docs/cluster.md)."""
    return min(1 << (21 if gpu else 18), max(8192, -(-n // 48)))


def import_ray() -> Any:
    """The `ray` module with Ray Data, or a UserError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return ray


def check_address(address: str) -> str:
    """`local`, `auto`, `ray://host:port` or a head's `host:port`; anything else is a UserError."""
    a = address.strip()
    if a in ("local", "auto") or a.startswith("ray://"):
        return a
    host, sep, port = a.rpartition(":")
    if sep and host and "/" not in host and port.isdigit():
        return a
    raise UserError(
        f"--ray {address!r}: expected local (start Ray here), auto (join this node's cluster), "
        "ray://HOST:PORT (a remote head) or HOST:PORT"
    )


class RaySession:
    """A Ray connection made on first use and released by `close()`.

    A Ray instance that this process had already started (`ray.init` in a notebook or a test) is
    used as it is and left running; one that `connect` started is shut down by `close`.

    Args:
        address: see `check_address`.
        match: run the matching on the cluster too (`--ray-match`).
        block_rows: rows per block of a matching tile (a task screens block x block); default
            `CLIPDEDUP_RAY_BLOCK_ROWS`, else `block_rows_for` the rows matched.
        actor_cpus: CPUs per CPU encoder actor (default `CLIPDEDUP_RAY_ACTOR_CPUS`, else 1).
    """

    def __init__(
        self,
        address: str,
        *,
        match: bool = False,
        block_rows: int | None = None,
        actor_cpus: int | None = None,
    ) -> None:
        self.address = check_address(address)
        self.match = match
        env = os.environ.get(BLOCK_ROWS_ENV)
        self.block_rows = block_rows or (int(env) if env else None)
        self.actor_cpus = actor_cpus or int(os.environ.get(ACTOR_CPUS_ENV) or 1)
        self.on_batch: Callable[[int], object] | None = None  # driver-side, after each result batch
        self.log: Callable[[str], object] | None = None  # one-line notices (the run's `say`)
        self.shipped_rows = 0  # rows the last matching sent through the object store (not the snapshot)
        self._ray: Any = None
        self._owned = False

    def connect(self) -> Any:
        """The `ray` module, connected (Ray Data's own progress output turned off)."""
        if self._ray is not None:
            return self._ray
        ray = import_ray()
        if not ray.is_initialized():
            # Ray's own notices (token setup) are not this run's business:
            # errors still arrive as exceptions, per-file failures as data.
            kw: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
            if self.address == "local":
                kw["include_dashboard"] = False
            try:
                ray.init(address=self.address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise UserError(f"--ray {self.address}: cannot connect ({first})") from None
            self._owned = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver shows one bar of its own
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        self._ray = ray
        return ray

    def close(self) -> None:
        if self._ray is not None and self._owned:
            self._ray.shutdown()
        self._ray, self._owned = None, False

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def gpus(self) -> int:
        return int(self.connect().cluster_resources().get("GPU", 0))

    def cpus(self) -> int:
        return max(1, int(self.connect().cluster_resources().get("CPU", 1)))


def task_error(e: BaseException) -> BaseException:
    """The error a user can act on inside a Ray task error (a UserError raised in a worker), else `e`."""
    cause: object = e
    for _ in range(3):  # an actor whose constructor failed: ActorDiedError -> RayTaskError -> error
        cause = getattr(cause, "cause", None)
        if isinstance(cause, UserError):
            return cause
    return e
