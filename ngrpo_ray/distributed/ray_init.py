"""Attaching the driver to Ray: the configured cluster, RAY_ADDRESS, or a local one."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import ray

from ngrpo_ray.config.schema import Config

logger = logging.getLogger(__name__)


def init_ray(cfg: Config, include_dashboard: Optional[bool] = None, **kwargs: Any) -> None:
    """Attach to cfg.cluster.address, else RAY_ADDRESS, else start a local cluster with cfg.cluster.num_cpus.

    A local cluster's dashboard listens on cfg.cluster.dashboard_host (127.0.0.1 by default). An existing cluster's
    dashboard was configured when it started (see cluster/README.md), so nothing about it is passed here.
    """
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # re-raised with the one hint that matters most on Ray >= 2.52
            if "auth" in str(exc).lower():
                raise RuntimeError(
                    f"could not attach to the Ray cluster at {address}: {exc}\nThe cluster uses token "
                    "authentication: set RAY_AUTH_MODE=token and provide the cluster's token through RAY_AUTH_TOKEN, "
                    "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (see cluster/README.md)."
                ) from exc
            raise
        return
    if cfg.cluster.dashboard_host not in ("127.0.0.1", "localhost"):
        logger.warning("Ray dashboard will listen on %s (cluster.dashboard_host): reachable beyond this machine",
                       cfg.cluster.dashboard_host)
    ray.init(
        num_cpus=cfg.cluster.num_cpus,
        include_dashboard=include_dashboard,
        dashboard_host=cfg.cluster.dashboard_host,
        **kwargs,
    )
