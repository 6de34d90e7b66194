"""``distgpt serve --ray``: join (or start) a Ray cluster and run the model there as a Ray Serve deployment."""

from __future__ import annotations

import argparse
import os
import sys

from distgpt.infer.options import InferError, ServeSpec


def scaling_from(args: argparse.Namespace, embedded: bool):
    """The ``Scaling`` the flags ask for (on the embedded cluster the machine's cores are shared among replicas)."""
    from distgpt.infer.ray_serve import Scaling

    lo = hi = args.replicas
    if args.autoscale:
        try:
            lo, hi = (int(x) for x in args.autoscale.split("-"))
        except ValueError:
            raise InferError(f"--autoscale takes MIN-MAX replicas, such as 1-4; got {args.autoscale!r}") from None
    gpus = args.replica_gpus if args.replica_gpus is not None else (1.0 if args.device.startswith("cuda") else 0.0)
    cpus = args.replica_cpus
    if cpus is None:  # embedded: this machine's cores shared out among the most replicas there may be
        cpus = (os.cpu_count() or 1) / max(hi, 1) if embedded else 1.0
    return Scaling(lo, hi, float(cpus), float(gpus), args.max_queued, args.upscale_delay, args.downscale_delay)


def serve_on_ray(args: argparse.Namespace, spec: ServeSpec) -> int:
    """Deploy, announce the URL, serve until Ctrl-C, then remove the app (and the cluster, if this started it)."""
    from distgpt.infer.ray_serve import deploy, replicas, serve_until_interrupted
    from distgpt.orchestrator.driver import connect

    problems = scaling_from(args, embedded=True).problems()  # before anything starts
    if problems:
        raise InferError("; ".join(problems))
    label = connect(args.address)
    embedded = label.startswith("embedded")
    scaling = scaling_from(args, embedded)
    count = (f"{scaling.min_replicas}" if scaling.min_replicas == scaling.max_replicas
             else f"{scaling.min_replicas}–{scaling.max_replicas} (autoscaling)")
    print(f"starting {count} replica(s) of {spec.model_id} on the {label}, {scaling.cpus:g} CPU"
          f"{f' + {scaling.gpus:g} GPU' if scaling.gpus else ''} each (a compiled engine compiles on first start) …",
          file=sys.stderr, flush=True)
    deployed = deploy(spec, scaling, args.host, args.port)

    def announce(url: str) -> None:
        print(f"serving {deployed.app} on {url} through Ray Serve ({replicas(deployed.app)} replica(s) running) — "
              f"OpenAI API: /v1/completions /v1/chat/completions /v1/models /health; Ctrl-C removes the app",
              flush=True)

    serve_until_interrupted(deployed, announce, embedded)
    return 0


def ray_only_flags(args: argparse.Namespace) -> list[str]:
    """The --ray flags given without --ray (they would change nothing: say so rather than ignore them)."""
    probe = argparse.ArgumentParser()
    add_arguments(probe)
    defaults = vars(probe.parse_args([]))  # the defaults as add_arguments declares them, not a second copy
    return [f"--{k.replace('_', '-')}" for k, v in defaults.items() if k != "ray" and getattr(args, k) != v]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``distgpt serve`` that only ``--ray`` uses."""
    g = p.add_argument_group("on Ray Serve (--ray)")
    g.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (replicas, autoscaling)")
    g.add_argument("--address", default="", help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded one)")
    g.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    g.add_argument("--autoscale", metavar="MIN-MAX", help="let Serve scale between MIN and MAX replicas")
    g.add_argument("--replica-cpus", type=float, help="CPUs per replica (embedded: the cores shared out; else 1)")
    g.add_argument("--replica-gpus", type=float, help="GPUs per replica (default: 1 with --device cuda, else 0)")
    g.add_argument("--max-queued", type=int, default=-1,
                   help="requests a proxy queues for busy replicas before 503 (default: max-concurrent × MAX)")
    g.add_argument("--upscale-delay", type=float, default=10.0, help="seconds of overload before adding a replica")
    g.add_argument("--downscale-delay", type=float, default=60.0, help="seconds idle before removing a replica")
