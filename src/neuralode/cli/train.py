"""The generic training loop: epochs, progress, metrics, checkpoints, Ctrl-C, DDP, final report.

Exactness of resumes: every random draw of training comes from torch's, numpy's or Python's
global generators or from one explicit ``torch.Generator`` that orders the data. Their states
are snapshotted at each step boundary and saved with the model and optimiser, together with
the position (epoch, batch within the epoch) and the generator's state at the start of the
epoch, so a resumed run redraws the same epoch order, skips the batches already done and
continues with the same random stream: on CPU its parameters end up bit-identical to those of
an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from neuralode.errors import SolveError
from neuralode.models.base import recording_steps

from . import distributed
from .checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    RunLock,
    atomic_save,
    check_belongs,
    load_checkpoint,
    rng_states,
    set_rng_states,
)
from .config import CONFIG_NAME, RESUMABLE_CHANGES, RunConfig, config_diff, read_run_config
from .errors import CLIError, TrainingError
from .rundir import (
    METRICS_NAME,
    PLOT_DIR,
    RUN_FILES,
    SUMMARY_NAME,
    build,
    read_metrics,
    resolve_device,
)
from .tasks.base import Task

__all__ = ["train", "check_run_dir", "resolve_device", "build"]

CHECKPOINT_FORMAT = 2  # 2: RNG states as tensors and plain data (weights_only)


def check_run_dir(out: Path, cfg: RunConfig, resume: bool) -> str:
    """Decide what to do with ``out`` before anything is written.

    Returns ``"new"`` (missing or empty folder), ``"restart"`` (an unfinished run with the
    same configuration: start over), ``"resume"`` or ``"finished"`` (the run has done
    ``cfg.epochs`` epochs already: nothing to do).

    Raises
    ------
    CLIError
        If ``out`` is a file, holds files but no run, holds a run with another configuration
        (unless resuming and only the number of epochs differs), or ``--resume`` finds nothing
        to resume.
    """
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a directory.")
    has_files = out.is_dir() and any(out.iterdir())
    if not (out / CONFIG_NAME).is_file():
        if has_files:
            raise CLIError(
                f"--out {out} is not empty and holds no neuralode run ({CONFIG_NAME} missing); "
                "choose an empty or new directory."
            )
        if resume:
            raise CLIError(f"--resume: nothing to resume in {out} (no {CONFIG_NAME}).")
        return "new"
    old = read_run_config(out)
    diff = config_diff(old, cfg, ignore=RESUMABLE_CHANGES if resume else ())
    if diff:
        what = "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
        if resume:
            raise CLIError(
                f"--resume: {out} holds a run with a different configuration ({what}); only "
                f"{', '.join(RESUMABLE_CHANGES)} may change when resuming."
            )
        raise CLIError(
            f"--out {out} holds a different run ({what}); pick another --out, or pass --resume "
            "to continue that run."
        )
    if resume and not (out / CHECKPOINT_NAME).is_file():
        raise CLIError(f"--resume: {out} has no {CHECKPOINT_NAME} to resume from.")
    if (out / CHECKPOINT_NAME).is_file():
        try:
            done = load_checkpoint(out / CHECKPOINT_NAME)["epoch"]
        except CLIError:
            if resume:
                raise
            done = -1  # unreadable: the identical command starts over, like any unfinished run
        if done >= cfg.epochs:
            return "finished"
    return "resume" if resume else "restart"


class _Objective(nn.Module):
    """The training loss as a module, so that ``DistributedDataParallel`` sees the forward."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._task = task

    def forward(self, indices: torch.Tensor, epoch: int, step: int):
        return self._task.train_loss(self.model, indices, epoch, step)


class _Interrupt:
    """Turns the first SIGINT (Ctrl-C) or SIGTERM into a flag checked at step boundaries.

    SIGTERM is what schedulers and clusters send before preemption (followed by SIGKILL after a
    grace period), so it is handled like Ctrl-C. A step is never cut in half, so the checkpoint
    written on the signal is consistent and the run resumes exactly; a second signal interrupts
    at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def exit_code(self) -> int:
        """``128 + signal number``, the shell's convention: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + int(self.signum or signal.SIGINT)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(
            f"\nneuralode: {name} received: stopping after this step (again to stop now)...",
            file=sys.stderr,
            flush=True,
        )

    @contextmanager
    def installed(self):
        main = threading.current_thread() is threading.main_thread()
        if main:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        try:
            yield self
        finally:
            if main:
                for s, h in self._previous.items():
                    signal.signal(s, h)


def _progress_bar(total: int, initial: int, desc: str, enabled: bool, unit="epoch", leave=True):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=True,
        leave=leave,
        file=sys.stderr,
    )


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def train(
    cfg: RunConfig,
    out: Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    evaluate: bool = True,
    checkpoint_every: int | None = None,
    tensorboard: bool = False,
) -> int:
    """Train ``cfg`` into the run directory ``out``; return the exit status (0, or 130 / 143
    after Ctrl-C / SIGTERM, with a checkpoint at the last completed step).

    Parameters
    ----------
    resume : bool
        Continue the run in ``out`` from its ``checkpoint.pt``.
    progress : bool or None
        Progress bar; ``None``: only when stderr is a terminal. Without a bar one line per
        epoch is printed.
    evaluate : bool
        Evaluate the best model on the held-out data, print the summary and draw the plots.
    checkpoint_every : int or None
        Also write ``checkpoint.pt`` every this many optimisation steps (besides each epoch's
        end), so that a run killed without warning loses at most that many steps.
    tensorboard : bool
        Log each epoch's metrics to ``out/tensorboard`` (:mod:`neuralode.cli.tracking`).
    """
    d = distributed.setup(resolve_device(cfg.device).type)
    lock = RunLock(out if d.is_main else None)
    try:
        lock.acquire()
        return _train(cfg, out, resume=resume, progress=progress, evaluate=evaluate, dist=d,
                      checkpoint_every=checkpoint_every, tensorboard=tensorboard,
                      lock=lock)  # fmt: skip
    finally:
        lock.release()
        distributed.teardown(d)


def _train(
    cfg,
    out,
    *,
    resume,
    progress,
    evaluate,
    dist,
    checkpoint_every=None,
    tensorboard=False,
    lock=None,
) -> int:
    mode = check_run_dir(out, cfg, resume)
    if mode == "finished":
        if dist.is_main:
            done = load_checkpoint(out / CHECKPOINT_NAME)["epoch"]
            # A run stopped during its last validation is finished but was never evaluated.
            see = (
                f"See its {SUMMARY_NAME} or run 'neuralode evaluate {out}'"
                if (out / SUMMARY_NAME).exists()
                else f"It was not evaluated: run 'neuralode evaluate {out}'"
            )
            print(
                f"neuralode: {out} already holds this run, finished ({done} epochs); "
                f"nothing to do. {see}; train it further with --resume --epochs N, or choose "
                "another --out to train again.",
                file=sys.stderr,
            )
        return 0
    task, model = build(cfg, dist)  # bad data raises here, before anything is written
    device = task.device
    if dist.enabled:
        torch.manual_seed(cfg.seed + dist.rank)  # independent noise per rank after the init
    objective = distributed.wrap(_Objective(task, model), dist, device)
    opt_cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[cfg.optimizer]
    optimizer = opt_cls(model.parameters(), lr=cfg.lr)
    scheduler = task.make_scheduler(optimizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    exported = task.export()  # channel names, normaliser, ...: for neuralode.load_run

    start_epoch, skip, step, best = 0, 0, 0, {"value": math.inf, "epoch": None}
    accum: dict = {}
    if mode == "resume":
        ck = load_checkpoint(out / CHECKPOINT_NAME)
        check_belongs(ck, cfg, out / CHECKPOINT_NAME)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None and ck.get("scheduler") is not None:
            scheduler.load_state_dict(ck["scheduler"])
        start_epoch, skip, step = ck["epoch"], ck["batch"], ck["step"]
        best, accum = ck["best"], ck["accum"]
        set_rng_states(ck["rng"])
        generator.set_state(ck["generator_epoch_start"])

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if lock is not None:
            lock.acquire()  # a new directory: locked now that it exists
        if mode == "restart":
            print(
                f"neuralode: {out} holds a run with the same configuration; starting it over "
                "(use --resume to continue it instead).",
                file=sys.stderr,
            )
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / PLOT_DIR, ignore_errors=True)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        cfg.save(out)
        rows = [r for r in read_metrics(out) if r["epoch"] <= start_epoch]
        _write_metrics(out, rows)
    dist.barrier()

    tb = None
    if tensorboard and dist.is_main:
        from .tracking import TensorBoardLog

        tb = TensorBoardLog(out, start_epoch)
    show = (sys.stderr.isatty() if progress is None else progress) and dist.is_main
    bar = _progress_bar(cfg.epochs, min(start_epoch, cfg.epochs), cfg.task, show)
    interrupt = _Interrupt()
    state = {"epoch": start_epoch, "batch": skip, "step": step, "accum": accum}
    snapshot = {"rng": rng_states(), "gen": generator.get_state()}
    # True from an optimiser step (or an epoch's bookkeeping) to the next boundary, while the
    # model, optimiser, scheduler or best model are ahead of ``state`` and ``snapshot``: a
    # second signal there must not write a checkpoint, which would resume from a state that
    # is neither this step nor the next (the previous checkpoint is kept instead).
    torn = False

    def checkpoint(at: dict, rng: dict, gen_start: torch.Tensor) -> None:
        if not dist.is_main:
            return
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "config": cfg.to_dict(),
                "data": exported,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "epoch": at["epoch"],
                "batch": at["batch"],
                "step": at["step"],
                "accum": at["accum"],
                "best": best,
                "rng": rng,
                "generator_epoch_start": gen_start,
            },
            out / CHECKPOINT_NAME,
        )

    try:
        with interrupt.installed():
            for epoch in range(start_epoch, cfg.epochs):
                gen_start = generator.get_state()
                batches = task.epoch_batches(generator)
                acc = state["accum"] if epoch == start_epoch and state["accum"] else {}
                acc.setdefault("time", 0.0)
                t_epoch = time.perf_counter()
                objective.train()
                first = skip if epoch == start_epoch else 0
                inner = _progress_bar(
                    len(batches), first, f"epoch {epoch + 1}", show, unit="step", leave=False
                )
                for b in range(first, len(batches)):
                    snapshot = {"rng": rng_states(), "gen": gen_start}
                    state.update(epoch=epoch, batch=b, accum=dict(acc))
                    torn = False
                    if dist.any(interrupt.requested, device):
                        raise KeyboardInterrupt
                    indices, weight = dist.shard(batches[b])
                    optimizer.zero_grad(set_to_none=True)
                    with recording_steps() as steps:
                        loss, logs = objective(indices, epoch, state["step"])
                    (loss * weight).backward()
                    torn = True
                    optimizer.step()
                    state["step"] += 1
                    nfe_f, nfe_b = task.nfe(model)
                    logs = {"train_loss": float(loss.detach()), **logs}
                    for k, v in logs.items():
                        acc[k] = acc.get(k, 0.0) + float(v)
                    acc["nfe_forward"] = acc.get("nfe_forward", 0) + nfe_f
                    acc["nfe_backward"] = acc.get("nfe_backward", 0) + nfe_b
                    acc["n"] = acc.get("n", 0) + 1
                    for k, v in (("solves", steps.n_solves), ("accepted", steps.n_accepted),
                                 ("rejected", steps.n_rejected), ("span", steps.span)):  # fmt: skip
                        acc[f"solver_{k}"] = acc.get(f"solver_{k}", 0.0) + v
                    inner.set_postfix_str(
                        f"loss {logs['train_loss']:.4g}, nfe f/b {nfe_f}/{nfe_b}", refresh=False
                    )
                    inner.update(1)
                    if checkpoint_every and state["step"] % checkpoint_every == 0:
                        # The boundary before batch b + 1: the same state a signal there saves.
                        at = {"epoch": epoch, "batch": b + 1, "step": state["step"]}
                        checkpoint({**at, "accum": dict(acc)}, rng_states(), gen_start)
                inner.close()
                acc["time"] += time.perf_counter() - t_epoch
                # Validation and the epoch's bookkeeping: a boundary of its own.
                snapshot = {"rng": rng_states(), "gen": gen_start}
                state.update(epoch=epoch, batch=len(batches), accum=dict(acc))
                torn = False
                if dist.any(interrupt.requested, device):
                    raise KeyboardInterrupt
                t_val = time.perf_counter()
                val = {}
                if dist.is_main:
                    objective.eval()
                    with torch.no_grad():
                        val = task.validate(model)
                torn = True
                if scheduler is not None:
                    scheduler.step()
                row = _epoch_row(acc, val, epoch + 1, state["step"])
                row["lr"] = optimizer.param_groups[0]["lr"]
                row["time_s"] = acc["time"] + time.perf_counter() - t_val
                if dist.is_main:
                    _append_metrics(out, row)
                    value = val[task.val_key]
                    if value < best["value"]:
                        best = {"value": float(value), "epoch": epoch + 1}
                        atomic_save(
                            {
                                "format": CHECKPOINT_FORMAT,
                                "config": cfg.to_dict(),
                                "data": exported,
                                "model": model.state_dict(),
                                "epoch": epoch + 1,
                                "step": state["step"],
                                "metrics": row,
                            },
                            out / BEST_NAME,
                        )
                state.update(epoch=epoch + 1, batch=0, accum={})
                checkpoint(state, rng_states(), generator.get_state())
                bar.update(1)
                if dist.is_main:
                    line = _epoch_line(row, cfg.epochs, task.val_key)
                    bar.set_postfix_str(line.split(": ", 1)[1], refresh=True)
                    if show:  # above the bar: the line stays in the terminal's scroll-back
                        bar.write(line, file=sys.stdout)
                        sys.stdout.flush()
                    else:
                        print(line, flush=True)
                    if tb is not None:
                        tb.log(row)
    except SolveError as exc:
        raise TrainingError(
            f"training failed in epoch {state['epoch'] + 1} (after step {state['step']}): {exc} "
            "The last checkpoint is kept; try a smaller --lr, tighter --rtol/--atol or another "
            "--method; past the step limit, a larger --step-size (fixed-step methods) or "
            "--max-steps N."
        ) from None
    except KeyboardInterrupt:
        bar.close()
        if torn:  # a second signal cut a step or an epoch's bookkeeping in half
            if dist.is_main:
                kept = out / CHECKPOINT_NAME
                where = (
                    f"the previous checkpoint {kept} is kept (continue with: neuralode train "
                    f"--out {out} --resume)"
                    if kept.is_file()
                    else "no checkpoint was written yet (run the same command again to start over)"
                )
                print(
                    "neuralode: stopped at once, in the middle of a step or of an epoch's "
                    f"bookkeeping, which is not saved; {where}.",
                    file=sys.stderr,
                    flush=True,
                )
            return interrupt.exit_code
        # Parameters and optimiser are those of the last completed step (a step is never cut in
        # half by the first Ctrl-C); the RNG snapshot is the one taken at that boundary.
        checkpoint(state, snapshot["rng"], snapshot["gen"])
        if dist.is_main:
            print(
                f"neuralode: interrupted at epoch {state['epoch'] + 1}, batch {state['batch']} "
                f"(step {state['step']}); checkpoint saved to {out / CHECKPOINT_NAME} (continue "
                f"with: neuralode train --out {out} --resume).",
                file=sys.stderr,
                flush=True,
            )
        return interrupt.exit_code
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    dist.barrier()
    if interrupt.requested:  # the signal came during the last epoch's validation or checkpoint
        if dist.is_main:
            print(
                f"neuralode: training finished ({cfg.epochs} epochs, checkpoint saved); the "
                f"held-out evaluation is skipped (run: neuralode evaluate {out}).",
                file=sys.stderr,
                flush=True,
            )
        return interrupt.exit_code
    if dist.is_main and evaluate:
        ckpt = out / BEST_NAME if (out / BEST_NAME).is_file() else out / CHECKPOINT_NAME
        from .evaluation import report

        model.load_state_dict(load_checkpoint(ckpt)["model"])
        report(task, model, out, ckpt, stdout=sys.stdout)
    return 0


def _epoch_row(acc: dict, val: dict, epoch: int, step: int) -> dict:
    """The ``metrics.jsonl`` row of an epoch from the sums over its steps and the validation."""
    n = max(acc.get("n", 0), 1)
    row = {"epoch": epoch, "step": step}
    for k, v in acc.items():
        if k not in ("n", "time", "nfe_forward", "nfe_backward") and not k.startswith("solver_"):
            row[k] = v / n
    row.update(val)
    row["nfe_forward"] = int(acc.get("nfe_forward", 0))
    row["nfe_backward"] = int(acc.get("nfe_backward", 0))
    row["nfe_forward_per_step"] = row["nfe_forward"] / n
    row["nfe_backward_per_step"] = row["nfe_backward"] / n
    solves, accepted = acc.get("solver_solves", 0), acc.get("solver_accepted", 0)
    if solves and accepted:
        # Forward solves of the training steps: time integrated per accepted step, and steps
        # per solve (per-sample solves count the average sample).
        row["mean_step_size"] = acc["solver_span"] / accepted
        row["accepted_steps_per_solve"] = accepted / solves
        row["rejected_steps_per_solve"] = acc["solver_rejected"] / solves
    return row


def _epoch_line(row: dict, epochs: int, val_key: str) -> str:
    parts = [f"loss {_fmt(row['train_loss'])}"]
    if val_key in row:
        parts.append(f"{val_key} {_fmt(row[val_key])}")
    parts.append(f"nfe f/b {row['nfe_forward_per_step']:.0f}/{row['nfe_backward_per_step']:.0f}")
    parts.append(f"{row['time_s']:.1f}s")
    return f"epoch {row['epoch']}/{epochs}: " + ", ".join(parts)


def _write_metrics(run_dir: Path, rows: list[dict]) -> None:
    path = run_dir / METRICS_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _append_metrics(run_dir: Path, row: dict) -> None:
    with open(run_dir / METRICS_NAME, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
