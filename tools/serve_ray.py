"""The server of tools/serve.py as a Ray Serve deployment: N replicas, each with its own engine
(one GPU each with the TensorRT backend), behind Ray Serve's HTTP proxy.

    python -m tools.serve ARTIFACT --ray-replicas 8                      # one machine
    python -m tools.serve ARTIFACT --ray-replicas 16 --ray-address auto  # a running cluster

Each replica builds the same Starlette app (`serve.ingress` with a builder, evaluated on the
replica), so routes, errors and streaming are those of the single-process server. The proxy
spreads requests over replicas and cancels a request whose client goes away. /health and
/metrics answer from whichever replica the proxy picks (the `pid` in /health says which).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # ray is an optional extra; tools.serve imports this module, on demand
    from ray.serve import Application
    from starlette.applications import Starlette

    from tools.serve import ServeConfig

APP_NAME = "trt-netdef"


def replica_resources(config: ServeConfig) -> dict[str, int]:
    """What Ray reserves for each replica: a GPU for the TensorRT backend, and a CPU."""
    return {"GPU": 1 if config.backend == "tensorrt" else 0, "CPU": 1}


def short_of(have: dict[str, float], need: dict[str, int], replicas: int) -> str | None:
    """Why a cluster with resources `have` cannot place `replicas` replicas, or None."""
    for kind, each in need.items():
        if each and have.get(kind, 0) < each * replicas:
            total = each * replicas
            return (
                f"--ray-replicas {replicas} needs {total} {kind}{'s' * (total != 1)} (one per "
                f"replica); the Ray cluster has {have.get(kind, 0):g}"
            )
    return None


def remedy(have: dict[str, float], need: dict[str, int]) -> str:
    """What to do about a cluster this command started that cannot place the replicas: fewer
    of them, unless it has no GPU at all for replicas that need one."""
    if need["GPU"] and not have.get("GPU"):
        return (
            "Ray sees no GPU on this machine: serve the engine where it does (--ray-address of "
            "a cluster with GPUs), or its network on the CPU with --backend reference"
        )
    return "start fewer replicas"


def deployment(config: ServeConfig, replicas: int) -> Application:
    """The bound Ray Serve application of `config`."""
    from ray import serve

    need = replica_resources(config)
    rows = config.rows()

    def build_app() -> Starlette:
        # Ray sends a replica up to `rows` requests beyond its rows (max_ongoing_requests):
        # its engine takes them all, or a small --max-queue would refuse what Ray routed.
        return replace(config, max_queue=rows).server().app

    return serve.deployment(
        serve.ingress(build_app)(),
        name="llm",
        num_replicas=replicas,
        ray_actor_options={"num_gpus": need["GPU"], "num_cpus": need["CPU"]},
        # A replica holds what fills its rows and the next ones to prefill; the rest wait
        # in Ray's router, which hands each to the replica that frees a row first (a
        # replica's own queue would bind a request to it early). Beyond max_queue
        # waiting, Ray answers 503.
        max_ongoing_requests=2 * rows,
        max_queued_requests=config.max_queue,
        graceful_shutdown_timeout_s=config.drain_timeout,
    ).bind()


def replica_failure(status: object) -> str:
    """Why the replicas did not start, from `serve.status()`: the last line of the failed
    deployment's message, which is the replica's exception (the model's, as a server without
    Ray says it)."""
    app = status.applications.get(APP_NAME)
    messages = [d.message for d in app.deployments.values() if d.message] if app else []
    last = messages[-1].strip().splitlines()[-1] if messages else "no reason given"
    return (
        f"the Ray Serve replicas failed to start: {last.split(': ', 1)[-1]} (Ray's logs, "
        "under /tmp/ray/session_latest/logs/serve/, hold the rest)"
    )


def run_on_ray(args: argparse.Namespace, config: ServeConfig) -> int:
    """Start (or join) a Ray cluster, deploy, serve until SIGTERM/SIGINT, then tear down."""
    import ray
    from ray import serve

    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    # After ray.init, whose own SIGTERM handler exits at once with code 15.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # Ray Serve waits, silently, until the cluster can place every replica: a cluster
        # this command started never grows, so it is refused; a running one may scale up.
        have, need = ray.cluster_resources(), replica_resources(config)
        missing = short_of(have, need, args.ray_replicas)
        if missing and args.ray_address is None:
            print(f"error: {missing}; {remedy(have, need)}.", file=sys.stderr)
            return 1
        if missing:
            print(
                f"warning: {missing} now; Ray Serve waits until it can place them.", file=sys.stderr
            )
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(deployment(config, args.ray_replicas), name=APP_NAME, route_prefix="/")
        except RuntimeError:  # "Deploying application trt-netdef failed", and a traceback
            print(f"error: {replica_failure(serve.status())}", file=sys.stderr)
            serve.shutdown()
            return 1
        print(
            f"Serving {config.served_name} on http://{args.host}:{args.port}/v1 with "
            f"{args.ray_replicas} Ray Serve replicas",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
        print("Draining the replicas.", file=sys.stderr, flush=True)
        serve.shutdown()  # each replica drains for graceful_shutdown_timeout_s
    finally:
        ray.shutdown()
    return 0
