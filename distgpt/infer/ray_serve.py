"""``distgpt serve --ray``: the model as a Ray Serve deployment — replicas, autoscaling, Ray's HTTP proxy in front.

Each replica builds the same ``Service`` the one-process server builds (``infer/service.py``) and answers through the
same ``infer/protocol.respond``, so a client sees one API either way; only the transport differs. Serve routes a
request to a replica with room (``max_ongoing_requests`` = the replica's ``max_concurrent``, so a replica is never
asked for more than its batcher holds), queues at most ``max_queued`` more per proxy and sheds the rest with Serve's
own 503, and — with ``--autoscale MIN-MAX`` — adds a replica when requests per replica exceed its cache slots and
removes one when they have stayed under for ``downscale_delay_s``. A client that disconnects mid-stream: the proxy
cancels the replica's task, whose event stream cancels the request (the slot is free at once).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

# torch before Ray (see orchestrator/driver.py: a Ray job that loads Ray first can fail at its first matmul)
import torch  # noqa: F401, I001  # isort: skip
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from distgpt.infer.artifact import stored_slots
from distgpt.infer.options import InferError, ServeSpec
from distgpt.infer.protocol import JsonReply, respond
from distgpt.infer.service import open_service
from distgpt.train.threads import use_threads


@dataclass(frozen=True)
class Scaling:
    """How many replicas and what each reserves. ``max_replicas > min_replicas`` turns on Serve's autoscaler."""

    min_replicas: int = 1
    max_replicas: int = 1
    cpus: float = 1.0
    """CPUs each replica reserves; torch in it uses that many threads (at least one)."""
    gpus: float = 0.0
    max_queued: int = -1
    """Requests a proxy holds for busy replicas before answering 503 (-1: ``max_concurrent`` × ``max_replicas``)."""
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0

    def problems(self) -> list[str]:
        """Settings that cannot work, each naming its flag."""
        out = []
        if not 1 <= self.min_replicas <= self.max_replicas:
            out.append(f"--replicas / --autoscale need 1 <= MIN <= MAX, got {self.min_replicas}-{self.max_replicas}")
        if self.cpus <= 0:
            out.append(f"--replica-cpus must be positive, got {self.cpus}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            out.append("--upscale-delay / --downscale-delay must be >= 0 seconds")
        return out


@serve.deployment(name="model")
class ModelServer:
    """One replica: the served model and the protocol, behind Serve's proxy."""

    def __init__(self, spec: ServeSpec, threads: int):
        use_threads(threads)  # the batcher thread adopts it (train/threads.py)
        context = serve.get_replica_context()
        self.svc = open_service(spec, replica=context.replica_id.unique_id)

    async def __call__(self, request: Request) -> Response:
        """Every route (the app is mounted at ``/``)."""
        reply = await respond(self.svc, request.method, request.url.path, request.body)
        if isinstance(reply, JsonReply):
            return JSONResponse(reply.body, status_code=reply.status)
        return StreamingResponse(reply.events, headers=dict(reply.headers))

    def __del__(self) -> None:
        svc = getattr(self, "svc", None)
        if svc is not None:
            svc.batcher.close()


def deployment_options(spec: ServeSpec, scaling: Scaling, slots: int, concurrent: int) -> dict:
    """Serve's options for the deployment: replicas or autoscaling, resources, admission (per replica)."""
    opts: dict = {
        "max_ongoing_requests": concurrent,
        "max_queued_requests": scaling.max_queued if scaling.max_queued >= 0 else concurrent * scaling.max_replicas,
        "ray_actor_options": {"num_cpus": scaling.cpus, "num_gpus": scaling.gpus},
        # a compiled engine's first start compiles for minutes: a replica is healthy once built, not before
        "health_check_period_s": 10, "health_check_timeout_s": 60, "graceful_shutdown_timeout_s": 5,
    }
    if scaling.max_replicas > scaling.min_replicas:
        opts["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "initial_replicas": scaling.min_replicas,
            "target_ongoing_requests": slots,  # a replica is full when every cache slot is decoding
            "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
            "metrics_interval_s": 1.0, "look_back_period_s": 2.0}
    else:
        opts["num_replicas"] = scaling.min_replicas
    return opts


@dataclass(frozen=True)
class Deployed:
    """A running distgpt app on Serve: its name and where its proxy listens."""

    app: str
    url: str


def deploy(spec: ServeSpec, scaling: Scaling, host: str, port: int) -> Deployed:
    """Start Serve (its proxy on ``host:port``) and run the model as app ``spec.model_id``; returns once every
    initial replica has loaded the model. Needs a connected Ray (``orchestrator.driver.connect``)."""
    problems = spec.problems() + scaling.problems()
    if problems:
        raise InferError("; ".join(problems))
    model = spec.model if "://" in spec.model else os.path.abspath(spec.model)  # replicas have their own cwd
    slots = spec.max_batch or stored_slots(model)  # a wrong path fails here, not as three failed replica starts
    spec = replace(spec, model=model)
    concurrent = spec.concurrent(slots)
    _start_serve(host, port)
    app = ModelServer.options(**deployment_options(spec, scaling, slots, concurrent)).bind(
        spec, max(1, int(scaling.cpus)))
    serve.run(app, name=spec.model_id, route_prefix="/")
    return Deployed(spec.model_id, f"http://{host if ':' not in host else f'[{host}]'}:{port}")


def _start_serve(host: str, port: int) -> None:
    """Start Serve with its proxy on ``host:port``, or check that the Serve already running on this cluster listens
    there: Serve's HTTP address is fixed per cluster, and ``serve.start`` would only log that it ignored ours."""
    serve.start(http_options={"host": host, "port": port})
    from ray.serve.context import _get_global_client  # no public getter for the running proxy's options (Ray 2.60)

    running = _get_global_client().http_config
    if (running.host, running.port) != (host, port):
        raise InferError(f"Ray Serve already runs on this cluster with its HTTP proxy on {running.host}:"
                         f"{running.port} (Serve's address is fixed per cluster) — fix: --host {running.host} "
                         f"--port {running.port}, or shut that Serve down first (`serve shutdown`)")


def replicas(app: str) -> int:
    """How many replicas of ``app`` are running now."""
    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def serve_until_interrupted(deployed: Deployed, announce: Callable[[str], None], embedded: bool) -> None:
    """Announce, wait for Ctrl-C, then delete the app (and stop Serve and Ray when this process started them)."""
    announce(deployed.url)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(deployed.app)
        if embedded:
            serve.shutdown()
            ray.shutdown()
