"""The trainer on several hosts: every host runs this script, one process per host.

Host 0 is the coordinator; every process gets the same flags except ``--process-id``::

    # on host 0 (10.0.0.1)
    python experiments/train_multihost.py --coordinator 10.0.0.1:1234 --num-processes 2 \
        --process-id 0 -- --dataset=cifar10 --model=resnet18 --optimizer=sam --augment
    # on host 1
    python experiments/train_multihost.py --coordinator 10.0.0.1:1234 --num-processes 2 \
        --process-id 1 -- --dataset=cifar10 --model=resnet18 --optimizer=sam --augment

Everything after ``--`` is a ``python -m sharpjax.train`` override (a ``TrainConfig`` field).
``jax.distributed.initialize`` joins the processes; the trainer then builds its mesh over
``jax.devices()``, every device of every host, shards each global batch of ``batch_size``
examples over it (each process gathers only its ``batch_size / num_processes`` rows) and keeps
params and optimizer state replicated, or split as ``--mesh`` says (``--mesh=fsdp=4`` on 2 hosts
of 2 devices: every parameter split over both hosts). Checkpoints and metrics files are written
by process 0 only when ``--workdir`` is given to it alone; give every process the same
``--seed``.

Each process first says whom it waits for, then waits up to ``--timeout`` seconds (default
300) for all of them to join; past that JAX's runtime aborts it with ``DEADLINE_EXCEEDED``
(start the processes closer together, or raise ``--timeout``).

Without ``--coordinator`` (or with ``--num-processes 1``) it is a plain single-process run.
On Cloud TPU, SLURM or Open MPI pass ``--auto`` instead: ``jax.distributed.initialize()`` then
finds everything itself. CPU-only clusters use gloo collectives (``--cpu-collectives gloo``,
what the test suite uses on localhost).
"""

from __future__ import annotations

import argparse
import sys


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1 :]
    else:
        overrides = []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", help="host:port of process 0 (e.g. 10.0.0.1:1234)")
    parser.add_argument("--num-processes", type=int, default=1, help="processes in all")
    parser.add_argument("--process-id", type=int, default=0, help="this process, 0-based")
    parser.add_argument(
        "--auto", action="store_true", help="jax.distributed.initialize() with no arguments"
    )
    parser.add_argument("--cpu-collectives", choices=("gloo", "mpi"), default=None)
    parser.add_argument(
        "--timeout",
        type=int,
        default=300,
        help="seconds to wait for every process to join: process 0 waits for the others to "
        "connect to --coordinator, the others for process 0 to listen there. Each process "
        "says whom it waits for before it waits; past the timeout JAX aborts it with "
        "DEADLINE_EXCEEDED. Default 300: start all processes within 5 minutes",
    )
    parser.add_argument(
        "--out", help="save final params and history here (.npz; '{process_id}' is filled in)"
    )
    args = parser.parse_args(argv)
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        parser.error(
            f"--process-id {args.process_id} must lie in [0, --num-processes {args.num_processes})"
        )
    if args.num_processes > 1 and not (args.coordinator or args.auto):
        parser.error("--num-processes > 1 needs --coordinator HOST:PORT (or --auto)")
    if args.timeout < 1:
        parser.error(f"--timeout {args.timeout} must be at least 1 (seconds)")
    return args, overrides


def _awaited(args: argparse.Namespace) -> str:
    if args.auto:
        return "the cluster's other processes (found by jax.distributed.initialize())"
    if args.process_id == 0:
        return (
            f"the other {args.num_processes - 1} process(es) to connect to --coordinator "
            f"{args.coordinator}"
        )
    return f"process 0 (the coordinator) to listen at --coordinator {args.coordinator}"


def join(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize``, waiting ``--timeout`` seconds for the other processes.

    Said before the wait, because when it runs out JAX's C++ runtime aborts the process
    ("DEADLINE_EXCEEDED ... RegisterTask") before Python could add a word; an error that does
    reach Python (a malformed address) is re-raised with the same explanation."""
    import jax

    fix = (
        "start every process with the same --coordinator and --num-processes and a distinct "
        "--process-id, check that the coordinator's host:port is reachable from every host, or "
        "wait longer with --timeout SECONDS"
    )
    print(
        f"process {args.process_id} of {args.num_processes}: waiting up to --timeout "
        f"{args.timeout} s for {_awaited(args)}; if it aborts with DEADLINE_EXCEEDED, {fix}.",
        file=sys.stderr,
        flush=True,
    )
    try:
        if args.auto:
            jax.distributed.initialize(initialization_timeout=args.timeout)
        else:
            jax.distributed.initialize(
                coordinator_address=args.coordinator,
                num_processes=args.num_processes,
                process_id=args.process_id,
                initialization_timeout=args.timeout,
            )
    except Exception as e:  # jax's runtime error type; the cause stays chained
        raise SystemExit(
            f"process {args.process_id} of {args.num_processes}: could not join "
            f"{_awaited(args)} within --timeout {args.timeout} s: {fix}. JAX said: "
            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from e


def main(argv: list[str]) -> None:
    args, overrides = parse(argv)
    import jax

    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    if args.auto or args.num_processes > 1:
        join(args)

    import numpy as np

    from sharpjax.train import train
    from sharpjax.train.config import config_from_args

    config = config_from_args(overrides)
    if jax.process_index() != 0 and config.workdir:
        config = config.replace(workdir=None, checkpoint_every=0)  # process 0 writes
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices",
        flush=True,
    )
    result = train(config)
    if args.out:
        from jax.experimental import multihost_utils

        # Params split over hosts (--mesh with fsdp spanning them) are gathered whole first.
        whole = multihost_utils.process_allgather(result.params, tiled=True)
        flat = [np.asarray(x).ravel() for x in jax.tree.leaves(whole)]
        leaves = jax.tree.leaves(result.params)
        # Where the run put things: the process of each mesh position (data, fsdp, model),
        # and how many of the parameter elements this process holds (distinct shards).
        mesh = leaves[0].sharding.mesh
        held = sum(
            sum({str(s.index): s.data.size for s in x.addressable_shards}.values()) for x in leaves
        )
        np.savez(
            args.out.format(process_id=jax.process_index()),
            mesh_processes=np.vectorize(lambda d: d.process_index)(mesh.devices),
            mesh_axes=np.array(mesh.axis_names),
            held_elements=np.array(held),
            params=np.concatenate(flat),
            train_loss=np.array([r["train_loss"] for r in result.history]),
            test_accuracy=np.array([r["test_accuracy"] or np.nan for r in result.history]),
            device_count=np.array(jax.device_count()),
        )
    if jax.process_index() == 0:
        print({k: result.final.get(k) for k in ("train_loss", "test_accuracy")}, flush=True)
    if args.num_processes > 1 or args.auto:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
