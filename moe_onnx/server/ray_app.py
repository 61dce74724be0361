"""The same app scaled out on Ray Serve: replicas behind Ray Serve's HTTP proxy.

    moe-onnx serve OUT --ray --replicas 2 [--threads 1] [--port 8000]

Each replica is a Ray actor that loads its own sessions (``--threads`` onnxruntime threads each)
and runs the app of :mod:`moe_onnx.server.app` with its own batching scheduler; Ray's proxy
routes every request to one replica (the less loaded of two it samples), so batching happens per
replica. A replica takes up to ``max_batch + max_queue`` requests and answers the next with the
app's own 429; Ray itself queues what no replica may take yet. ``serve run`` works too, with
:func:`app_builder` as the import path and the CLI's options as arguments:

    serve run moe_onnx.server.ray_app:app_builder outs=/path/to/export replicas=2 threads=1
"""

from __future__ import annotations

import logging
import os
import signal
import time

from ray import serve

from moe_onnx.server.config import ServeConfig

log = logging.getLogger(__name__)


def deployment(config: ServeConfig, replicas: int):
    """A bound Ray Serve application: ``replicas`` copies of the app of ``config``."""
    if replicas < 1:
        raise ValueError("--replicas must be at least 1")

    def build_app():  # runs in each replica: its own sessions and decode threads
        from moe_onnx.server.config import build

        return build(config)

    ingress = serve.ingress(build_app)()
    return serve.deployment(
        ingress, name="moe-onnx", num_replicas=replicas,
        # above the replica's own limit, so that a full replica answers its JSON 429 itself
        max_ongoing_requests=config.max_batch + config.max_queue + 8,
        ray_actor_options={"num_cpus": config.threads or 1},
    ).bind()


def app_builder(args: dict):
    """For ``serve run moe_onnx.server.ray_app:app_builder outs=A,B replicas=2 threads=1 ...``."""
    outs = tuple(str(args["outs"]).split(","))
    config = ServeConfig(outs, provider=args.get("provider", "auto"),
                         threads=int(args["threads"]) if "threads" in args else None,
                         max_batch=int(args.get("max_batch", 8)), max_queue=int(args.get("max_queue", 64)),
                         api_key=args.get("api_key"), batching=args.get("batching", "continuous"),
                         prefill_chunk=int(args.get("prefill_chunk", 256)),
                         prefix_cache_mb=float(args.get("prefix_cache_mb", 256)))
    return deployment(config, int(args.get("replicas", 1)))


def serve_with_ray(config: ServeConfig, replicas: int) -> None:
    """Start a local Ray, deploy, serve on ``config.host:config.port`` until interrupted."""
    import ray

    def stop(signum, frame):  # SIGTERM too ends with serve.shutdown() and ray.shutdown()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    per_replica = config.threads or 1
    # a local Ray sized so that every replica is placed even where cores are fewer than threads
    # address="local": a Ray of our own, never a cluster some other job started on this machine
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, replicas * per_replica),
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(deployment(config, replicas), name="moe-onnx", route_prefix="/")
        log.warning("moe-onnx serve: %d Ray Serve replicas of %s on http://%s:%d/v1", replicas,
                    ", ".join(config.outs), config.host, config.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
