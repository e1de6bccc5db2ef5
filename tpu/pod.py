"""Create a TPU VM slice, install celora-jax on every host, launch one run on all of them.

    python tpu/pod.py create --name celora --zone us-central2-b --accelerator v4-32
    python tpu/pod.py setup  --name celora --zone us-central2-b --accelerator v4-32
    python tpu/pod.py run    --name celora --zone us-central2-b --accelerator v4-32 --preset pod
    python tpu/pod.py delete --name celora --zone us-central2-b --accelerator v4-32

Every command takes ``--dry-run``: it prints the gcloud commands instead of running them,
and for ``run`` it also validates the configuration and the device mesh on this machine's
CPU with as many fake devices as the slice has chips, printing which clients each host
will load and train. ``run`` starts the same ``celora-jax run --distributed`` on every host
(``gcloud compute tpus tpu-vm ssh --worker=all``); ``jax.distributed.initialize`` finds the
other hosts by itself on TPU VMs. Process 0 (worker 0) writes the results under
``--output-dir`` on its own disk; each host's log goes to ``~/celora-logs/``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPO = "https://github.com/celora-jax/celora-jax.git"
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
            "v6e": "v2-alpha-tpuv6e"}


def slice_shape(accelerator: str) -> tuple[int, int]:
    """(hosts, chips per host) of a TPU accelerator type such as v4-32 or v5litepod-16."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", accelerator)
    if not match:
        raise ValueError(f"unknown accelerator type {accelerator!r}; expected v4-N, v5p-N, v5litepod-N "
                         "or v6e-N (or give --hosts and --chips-per-host)")
    family, size = match.group(1), int(match.group(2))
    # v4 and v5p names count TensorCores (2 per chip); v5e/v6e names count chips.
    chips = size // 2 if family in ("v4", "v5p") else size
    if chips < 1:
        raise ValueError(f"{accelerator!r} has no chips")
    if family in ("v5litepod", "v6e") and chips <= 8:
        return 1, chips  # single-host slices carry up to 8 chips
    per_host = min(4, chips)
    if chips % per_host:
        raise ValueError(f"{accelerator!r}: {chips} chips do not fill hosts of {per_host}")
    return chips // per_host, per_host


def gcloud_commands(args) -> list[list[str]]:
    base = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = [args.name, f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    if args.command == "create":
        family = args.accelerator.split("-")[0]
        return [base + ["create"] + where + [f"--accelerator-type={args.accelerator}",
                                              f"--version={args.runtime or RUNTIMES.get(family, 'tpu-ubuntu2204-base')}"]]
    if args.command == "delete":
        return [base + ["delete"] + where + ["--quiet"]]
    if args.command == "setup":
        remote = (f"(git clone {shlex.quote(args.repo)} celora-jax || git -C celora-jax pull) && cd celora-jax && "
                  "bash setup.sh && .venv/bin/pip install --quiet -U 'jax[tpu]'")
    else:
        run = ["mkdir", "-p", "~/celora-logs", "&&", "cd", "celora-jax", "&&", ".venv/bin/celora-jax", "run",
               "--preset", args.preset, "--distributed", "--no-progress", "--output-dir", args.output_dir]
        if args.methods:
            run += ["--methods", args.methods]
        for override in args.overrides:
            run += ["--set", shlex.quote(override)]
        remote = " ".join(run) + " 2>&1 | tee ~/celora-logs/run-$(hostname).log"
    return [base + ["ssh"] + where + ["--worker=all", f"--command={remote}"]]


def validate(args, hosts: int, chips_per_host: int) -> str:
    """Checks the run's config, data split and mesh on fake CPU devices; returns the plan.

    Must run before jax is imported in this process (the device count is an XLA flag).
    """
    devices = hosts * chips_per_host
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(ROOT))
    import jax

    from celora_jax.data.partition import partition
    from celora_jax.data.text import load_text_dataset
    from celora_jax.federated import sharding
    from celora_jax.federated.config import apply_overrides
    from celora_jax.federated.engine import shared_checkpoint_path
    from celora_jax.federated.methods import get_method
    from celora_jax.federated.presets import get_preset

    if jax.device_count() != devices:
        raise ValueError(f"expected {devices} fake devices, jax sees {jax.device_count()} "
                         "(was jax imported before validate?)")
    config = apply_overrides(get_preset(args.preset), args.overrides)
    for method in (args.methods.split(",") if args.methods else [config.federation.method]):
        get_method(method.strip())
    if hosts > 1 and config.checkpoint.every > 0 and not config.checkpoint.directory:
        raise ValueError("checkpoints of a multi-host run need a checkpoint.directory that every host sees: "
                         "set checkpoint.directory='gs://<bucket>/<path>' (or a shared NFS path)")
    fed, part = config.federation, config.partition
    if chips_per_host % fed.data_parallel:
        raise ValueError(f"federation.data_parallel={fed.data_parallel} must divide the {chips_per_host} chips "
                         "per host: a client's data-parallel group stays on one host")
    mesh = sharding.client_mesh(fed.num_devices, fed.data_parallel)
    used, groups = mesh.devices.size, mesh.shape[sharding.CLIENTS]
    if used % chips_per_host:
        raise ValueError(f"federation.num_devices={used} must be a multiple of the {chips_per_host} chips "
                         "per host: every host takes part in the mesh")
    dataset = load_text_dataset(config.data)
    partition(dataset.labels, part, dataset.groups)  # raises if the data cannot be split so
    # The plan is for TPUs, where 'auto' means all clients at once (not these fake CPU devices' rule).
    planned_block = None if fed.client_block == "auto" else fed.client_block
    total = sharding.padded_client_count(part.num_clients, mesh, planned_block)
    block = sharding.client_block_size(planned_block, mesh)
    per_group = total // groups
    groups_per_host = chips_per_host // fed.data_parallel
    lines = [f"slice: {hosts} hosts x {chips_per_host} chips = {devices} devices; "
             f"mesh clients={groups} x data={fed.data_parallel} "
             f"(each client's batch of {fed.batch_size} split over {fed.data_parallel} chips)",
             f"clients: {part.num_clients} real, padded to {total} ({per_group} per client group); "
             f"block: {block or 'all at once'}; rounds: {fed.rounds}; model: {config.model.architecture} "
             f"{config.model.path or '(shipped default)'}; dtype {config.model.dtype}"]
    if config.checkpoint.every > 0:
        where = (shared_checkpoint_path(config.checkpoint.directory, config.name, "<method>")
                 if config.checkpoint.directory
                 else f"{args.output_dir}/{config.name}/<method>/checkpoints (host 0's disk)")
        lines.append(f"checkpoints: every {config.checkpoint.every} rounds to {where}"
                     + ("" if where.startswith("gs://") or hosts == 1 else "; every host must see this path"))
    for host in range(used // chips_per_host):
        start = host * groups_per_host * per_group
        stop = min(start + groups_per_host * per_group, part.num_clients)
        lines.append(f"  host {host}: clients {start}..{max(start, stop) - 1} "
                     f"({max(stop - start, 0)} real) loaded and trained here")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("create", "setup", "run", "delete"))
    parser.add_argument("--name", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--accelerator", required=True, help="e.g. v4-32, v5p-64, v5litepod-16")
    parser.add_argument("--hosts", type=int, default=None, help="override the hosts of --accelerator")
    parser.add_argument("--chips-per-host", type=int, default=None)
    parser.add_argument("--runtime", default=None, help="TPU VM software version (default per family)")
    parser.add_argument("--repo", default=DEFAULT_REPO, help="git URL cloned on every host by setup")
    parser.add_argument("--preset", default="pod")
    parser.add_argument("--methods", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", default="~/celora-runs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands; for run also validate")
    args = parser.parse_args(argv)
    try:
        hosts, chips = slice_shape(args.accelerator)
        hosts, chips = args.hosts or hosts, args.chips_per_host or chips
        commands = gcloud_commands(args)
        if args.command == "run":  # validate before launching, and in dry runs
            print(validate(args, hosts, chips))
    except ValueError as err:
        print(f"pod: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for command in commands:
        print(shlex.join(command))
        if not args.dry_run:
            done = subprocess.run(command)
            if done.returncode:
                return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
