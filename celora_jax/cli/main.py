"""Command line: ``celora-jax run`` (federated fine-tuning), ``celora-jax presets`` and
``celora-jax flower-app`` (a Flower app directory for ``flwr run``).

    celora-jax run                                   # default preset, CE-LoRA
    celora-jax run --methods all --set federation.rounds=4
    celora-jax run --preset smoke --methods celora,fedavg_lora --output-dir /tmp/runs
    celora-jax flower-app my_app --preset smoke --set federation.rounds=4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import traceback

from celora_jax.federated.methods import get_method, method_names

logger = logging.getLogger("celora_jax")

_HEATMAP_KEYS = ("weights", "data_distance", "param_distance")


def _parse_methods(text: str | None, default: str) -> list[str]:
    if text is None:
        return [default]
    names = method_names() if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    for name in names:
        get_method(name)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"--methods lists {', '.join(duplicates)} more than once; each method runs once "
                         "into its own directory")
    return names


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="celora-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="federated fine-tuning of one or more methods")
    run.add_argument("--preset", default="default", help="named preset (see `celora-jax presets`)")
    run.add_argument("--methods", default=None,
                     help=f"comma-separated methods or 'all' ({', '.join(method_names())}); "
                          "default: the preset's method")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set federation.rounds=4 (repeatable)")
    run.add_argument("--output-dir", default=None, help="root of outputs (default: the preset's output_dir)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.add_argument("--resume", default=None, metavar="DIR",
                     help="continue an interrupted run from its latest checkpoint: DIR is a method's "
                          "output directory (with config.json) or a run directory holding several")
    multi = run.add_argument_group(
        "several processes", "one run over the devices of several processes (TPU pod hosts, GPU hosts, "
        "or CPU processes): start the same command in every process")
    multi.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize(); with no other flag the cluster is "
                            "detected (TPU pods, SLURM, ...)")
    multi.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0's coordinator service (implies --distributed)")
    multi.add_argument("--num-processes", type=int, default=None)
    multi.add_argument("--process-id", type=int, default=None)
    commands.add_parser("presets", help="list the named presets")
    flower = commands.add_parser(
        "flower-app", help="write a Flower app directory for `flwr run` (needs the flower extra)",
        description="Writes DIR/pyproject.toml: a Flower app whose ServerApp and ClientApp run a celora-jax "
                    "preset's method (docs page 'Deploying with Flower'). Then: flwr run DIR <superlink> --stream")
    flower.add_argument("directory", metavar="DIR")
    flower.add_argument("--preset", default="smoke", help="named preset (default: smoke)")
    flower.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, as for `run` (repeatable)")
    flower.add_argument("--output-dir", default="", help="where the ServerApp writes flower_summary.json")
    flower.add_argument("--round-timeout", type=float, default=600.0,
                        help="seconds to wait for the nodes of a round (default 600)")
    worker = commands.add_parser(
        "flower-worker", help="keep a SuperNode's client prepared between messages (needs the flower extra)",
        description="Serves the messages a SuperNode forwards (node config worker=SOCKET) from one long-running "
                    "process, so that each message no longer rebuilds the task (docs page 'Deploying with Flower').")
    worker.add_argument("socket", metavar="SOCKET", help="the Unix socket to listen on, e.g. /tmp/celora-node0.sock")
    flower.add_argument("--node-data", action="store_true",
                        help="every SuperNode reads its own file (data-path=... in its node config); needs "
                             "--set data.label_names=...")
    return parser


def _flower_worker(args) -> int:
    try:
        from celora_jax.flower import worker
        from celora_jax.flower.app import make_worker_app
    except ImportError as err:
        raise ValueError(f"the Flower worker needs the flower extra: pip install 'celora-jax[flower]' ({err})") from None
    logging.getLogger("celora_jax").setLevel(logging.INFO)  # the node's set-up lines, as a SuperNode shows them
    worker.serve(args.socket, make_worker_app)
    return 0


def _flower_app(args) -> int:
    from celora_jax.federated.config import apply_overrides
    from celora_jax.federated.nodes import unsupported_reason
    from celora_jax.federated.presets import get_preset
    from celora_jax.federated.setup import adapter_config_for, resolve_method

    config = apply_overrides(get_preset(args.preset), args.overrides)  # refuses a bad preset or override now
    method = resolve_method(config)
    reason = unsupported_reason(method, adapter_config_for(config, method))
    if reason:
        raise ValueError(f"method {config.federation.method!r} cannot run on Flower nodes: it {reason}")
    if args.round_timeout <= 0:
        raise ValueError(f"--round-timeout must be positive, got {args.round_timeout}")
    if args.node_data and config.data.label_names is None:
        raise ValueError("--node-data needs the classes every node maps its labels to: --set "
                         "data.label_names=name0,name1,...")
    if any(";" in item for item in args.overrides):
        raise ValueError("an override for a Flower app cannot contain ';' (it separates the overrides)")
    try:
        from celora_jax.flower.app_dir import write_app
    except ImportError as err:
        raise ValueError(f"the Flower app needs the flower extra: pip install 'celora-jax[flower]' ({err})") from None
    directory = write_app(args.directory, {"preset": args.preset, "set": "; ".join(args.overrides),
                                           "output-dir": args.output_dir, "round-timeout": args.round_timeout,
                                           "node-data": args.node_data})
    print(f"wrote {directory / 'pyproject.toml'}: {config.federation.method} on {config.partition.num_clients} "
          f"SuperNodes (partition-id 0..{config.partition.num_clients - 1}"
          f"{', each with its own data-path' if args.node_data else ''}), {config.federation.rounds} rounds\n"
          f"run it with: flwr run {directory} <superlink connection> --stream")
    return 0


def _resume_plan(directory: str, overrides: list[str]):
    """(run root, [(method config, method dir)]) of an interrupted run."""
    from celora_jax.federated.config import apply_overrides, from_dict

    directory = pathlib.Path(directory)
    method_dirs = ([directory] if (directory / "config.json").is_file()
                   else sorted(p.parent for p in directory.glob("*/config.json")))
    if not method_dirs:
        raise ValueError(f"--resume {directory}: no config.json there or in its subdirectories")
    plan = [(apply_overrides(from_dict(json.loads((d / "config.json").read_text())), overrides), d)
            for d in method_dirs]
    return method_dirs[0].parent, plan


def create_output_directory(root: pathlib.Path) -> None:
    """Creates the run's output directory before anything is loaded, or says why it cannot."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the output directory {root}: {err.strerror or err}") from None
    if not os.access(root, os.W_OK):
        raise ValueError(f"the output directory {root} is not writable")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` before any device is touched; CPU processes exchange
    collectives through gloo (accelerator backends ignore that setting)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    logger.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())


def _run(args) -> int:
    import dataclasses

    from celora_jax.cli.reporting import plot_curves, plot_heatmaps, summary_table
    from celora_jax.federated import engine
    from celora_jax.federated.config import apply_overrides, to_json
    from celora_jax.federated.presets import get_preset

    if args.resume:
        root, plan = _resume_plan(args.resume, args.overrides)
    else:
        config = apply_overrides(get_preset(args.preset), args.overrides)
        root = pathlib.Path(args.output_dir or config.output_dir) / config.name
        plan = [(dataclasses.replace(config, federation=dataclasses.replace(config.federation, method=name)),
                 root / name)
                for name in _parse_methods(args.methods, config.federation.method)]
    if args.print_config:
        for method_config, _ in plan:
            print(to_json(method_config))
        return 0
    if args.distributed or args.coordinator:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    writer = jax.process_index() == 0  # every process computes; process 0 writes
    if writer:
        create_output_directory(root)
    summaries, histories = [], {}
    for position, (method_config, method_dir) in enumerate(plan):
        name = method_config.federation.method
        try:
            result = engine.run(method_config, progress=not args.no_progress, output_dir=method_dir,
                                resume=bool(args.resume))
        except KeyboardInterrupt as interrupt:
            interrupt.resume_hint = _resume_hint(method_config, method_dir,
                                                 [config.federation.method for config, _ in plan[position + 1:]])
            raise
        summaries.append(result.summary)
        histories[name] = result.history
        final = result.history[-1]
        # The data distance is constant and recorded once, with round 1.
        matrices = {key: next((r[key] for r in reversed(result.history) if key in r), None) for key in _HEATMAP_KEYS}
        if writer and all(value is not None for value in matrices.values()):
            plot_heatmaps(matrices, method_dir / "weights_final.png", title=f"{name}: round {final['round']}")
    table = summary_table(summaries)
    if not writer:
        return 0
    (root / "summary.md").write_text(table + "\n")
    (root / "summary.json").write_text(json.dumps(summaries, indent=2))
    plot_curves(histories, root / "curves.png")
    print(table)
    print(f"\nresults: {root}/ (metrics.jsonl per method, summary.md, curves.png)")
    return 0


def _resume_hint(config, method_dir: pathlib.Path, not_started: list[str]) -> str:
    """What an interrupted run left to resume from, for the one line the CLI prints."""
    from celora_jax.federated import checkpoint, engine

    directory = engine.checkpoint_directory(config, method_dir)
    step = checkpoint.latest_step(directory) if directory is not None else None
    if step is not None:
        hint = (f"resume with: celora-jax run --resume {method_dir} (its checkpoint after round {step} "
                f"of {config.federation.rounds})")
    elif config.checkpoint.every > 0:
        hint = (f"{config.federation.method} wrote no checkpoint yet (the first comes after round "
                f"{min(config.checkpoint.every, config.federation.rounds)}), so nothing to resume")
    else:
        hint = (f"{config.federation.method} saves no checkpoints, so nothing to resume "
                "(--set checkpoint.every=N saves one every N rounds)")
    if not_started:
        hint += f"; not started: {', '.join(not_started)}"
    return hint


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or ``kill``), handled as Ctrl-C is: the run stops at the next
    Python instruction, a checkpoint being written is finished first."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def describe_preset(name: str, preset) -> str:
    """One line: method, data, clients and partition (with the parameter that matters for
    its scheme), rounds, sequence length."""
    fed, part, data = preset.federation, preset.partition, preset.data
    detail = {"dirichlet": f"alpha={part.alpha}", "dirichlet_source": f"alpha={part.alpha}",
              "pathological": f"{part.labels_per_client} labels each", "clustered_labels": f"{part.num_clusters} clusters",
              "clustered_domains": f"{part.num_clusters} clusters",
              "clustered_rotations": f"{part.num_clusters} clusters"}.get(part.scheme)
    source = data.path or (data.corpus if preset.model.architecture not in ("vlm", "vit") else "fashion-mnist")
    if preset.model.objective == "next_token":
        source = f"{source} (next-token)"
    scheme = part.scheme if detail is None else f"{part.scheme} ({detail})"
    size = (f"images {preset.model.image_size}px" if preset.model.architecture == "vit"
            else f"seq {preset.model.max_length}")
    return f"{name}: {fed.method}, {source}, {part.num_clients} clients, {scheme}, {fed.rounds} rounds, {size}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _build_parser().parse_args(argv)
    if args.command == "presets":
        from celora_jax.federated.presets import PRESETS

        for name, preset in PRESETS.items():
            print(describe_preset(name, preset))
        return 0
    try:
        with _sigterm_as_interrupt():
            if args.command == "flower-worker":
                return _flower_worker(args)
            return _flower_app(args) if args.command == "flower-app" else _run(args)
    except ValueError as err:  # config, data, model and checkpoint errors carry clear messages
        print(f"celora-jax: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or directory the user named that cannot be read or written
        where = f" {err.filename}" if err.filename else ""
        print(f"celora-jax: error: cannot use{where}: {err.strerror or _one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (Terminated): 128 + the signal's number
        signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        hint = getattr(interrupt, "resume_hint", None)
        print(f"celora-jax: interrupted ({signum.name})" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 128 + signum
    except Exception as err:  # a bug: the traceback is for us, the last line for the user
        traceback.print_exc()
        print(f"celora-jax: internal error: {type(err).__name__}: {_one_line(err)[:300]} (a bug in celora-jax, "
              "not in your input: please report it with the command line and the traceback above)",
              file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
