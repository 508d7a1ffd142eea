"""Can the cluster ever hold what a stage asks for? Checked before a stage starts its workers, actors or replicas.

Ray queues a request no node can hold and waits for the autoscaler, which answers "No available node types can
fulfill resource request" in its own log while the job waits forever (Ray Train's controller retries without
limit). So each stage states its demands (one bundle per worker, actor or replica, and how many) with the config
key that sets each, and :func:`check_fits` compares them with what the cluster has (its alive nodes) and what its
autoscaler can add (the node types Ray's autoscaler reports to the GCS, with their max counts). A demand that can
never fit stops the stage at once, naming the key, what one node would need and the largest node there is.

Ray has no public call that answers "could this bundle ever be scheduled"; this module reads its node list and the
autoscaler's cluster config from the GCS (``ray._private.state``) to answer it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class CapacityError(RuntimeError):
    """A demand that no node of the cluster, nor any node type its autoscaler can add, could ever hold."""


@dataclass(frozen=True)
class Demand:
    """What one stage asks Ray for: ``count`` copies of ``bundle`` (each on one node), set by config ``keys``."""

    keys: str  # e.g. "train.cpus_per_worker / train.use_gpu"
    what: str  # e.g. "training worker"
    bundle: dict[str, float]
    count: int = 1


@dataclass(frozen=True)
class Offer:
    """A node, or a node type the autoscaler may add up to ``count`` of (None: a node that exists, once)."""

    name: str
    resources: dict[str, float]
    count: int | None = None  # autoscaler node types: their max count (-1: unbounded)


def holds(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of ``bundle`` one node with ``resources`` holds (a large number for an empty bundle)."""
    need = {k: v for k, v in bundle.items() if v > 0}
    if not need:
        return 1 << 30
    return min(int(resources.get(k, 0.0) // v) for k, v in need.items())


def _shown(resources: dict[str, float], keys=("CPU", "GPU")) -> str:
    """The resources that matter to a demand (``keys``), as a short literal: ``{'CPU': 1, 'GPU': 0}``."""
    shown = {k: resources.get(k, 0) for k in keys}
    return "{" + ", ".join(f"'{k}': {int(v) if float(v).is_integer() else v}" for k, v in shown.items()) + "}"


def cluster_offers() -> tuple[list[Offer], bool]:
    """The alive nodes' total resources, and the autoscaler's node types; the flag says whether the node types
    could be read (False where an autoscaler that does not report them runs, so more may come than is seen)."""
    import ray
    from ray._private.state import state

    offers = [Offer(f"node {n.get('NodeManagerAddress', '?')}", dict(n.get("Resources") or {}))
              for n in ray.nodes() if n.get("Alive")]
    types_known = True
    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the autoscaler's state service
        config = None
    if config is not None:
        for group in config.node_group_configs:
            offers.append(Offer(f"node type {group.name}", {k: float(v) for k, v in group.resources.items()},
                                int(group.max_count)))
    else:
        types_known = not _v1_autoscaler_running()
    return offers, types_known


def _v1_autoscaler_running() -> bool:
    """Whether the cluster launcher's autoscaler (which does not report its node types to the GCS) runs here.

    Every ``ray start --head`` runs a monitor; without an autoscaling config its provider only mirrors the nodes
    there are, each its own type named ``node_<node id>``. Any other type name is a configured node type, which the
    autoscaler may launch."""
    import json

    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) if _internal_kv_initialized() else None
        report = (json.loads(raw) or {}).get("autoscaler_report") or {} if raw else {}
    except Exception:  # noqa: BLE001 - unreadable: assume none, the alive nodes are all there is
        return False
    mapping = report.get("node_type_mapping") or {}
    return any(kind != f"node_{node_id}" for node_id, kind in mapping.items())


def unfit(demands: list[Demand], offers: list[Offer], types_known: bool = True) -> list[str]:
    """One sentence per demand that can never be met: no node holds one bundle, or (where every node type is
    known) all the nodes there are and may be added hold fewer copies than asked for."""
    problems = []
    for d in demands:
        if d.count <= 0:
            continue
        need = [k for k, v in d.bundle.items() if v > 0]
        per = [(o, holds(o.resources, d.bundle)) for o in offers]
        if not any(n > 0 for _, n in per):
            if not types_known:
                logger.warning("ray-e5: no node seen holds %s %s; an autoscaler may add one", d.what, d.bundle)
                continue
            largest = max(offers, key=lambda o: (o.resources.get("GPU", 0), o.resources.get("CPU", 0)),
                          default=None)
            problems.append(
                f"{d.keys}: each {d.what} needs {_shown(d.bundle, need)} on one node, but no node of this cluster "
                f"{'nor any node type its autoscaler can add ' if any(o.count is not None for o in offers) else ''}"
                f"has that much; the largest is {largest.name if largest else 'none'} with "
                f"{_shown(largest.resources, need) if largest else '{}'}. Lower {d.keys.split(' / ')[0]}, or add a node "
                "type that holds it")
            continue
        if not types_known or any(o.count is not None and o.count < 0 and n > 0 for o, n in per):
            continue  # unbounded: as many as asked for can be added
        room = sum(n * (o.count if o.count is not None else 1) for o, n in per)
        if room < d.count:
            problems.append(f"{d.keys}: {d.count} x {d.what} {_shown(d.bundle, need)} do not fit this cluster at its "
                            f"largest (room for {room}); ask for at most {room}, or for less per {d.what}")
    return problems


def check_fits(demands: list[Demand]) -> None:
    """Raise :class:`CapacityError` listing every demand of ``demands`` that this cluster can never meet."""
    offers, types_known = cluster_offers()
    problems = unfit(demands, offers, types_known)
    if problems:
        raise CapacityError("this Ray cluster can never run the stage as configured:\n  " + "\n  ".join(problems))
