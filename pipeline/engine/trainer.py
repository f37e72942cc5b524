"""The unlearning training loop: one loop for every method (methods only supply losses)."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional

import torch

from pipeline.data.collate import pad_batch
from pipeline.engine import checkpoint as ckpt
from pipeline.engine import faults, health
from pipeline.engine.batching import BatchPlan
from pipeline.engine.distributed import (
    all_reduce_sum,
    all_true,
    barrier,
    cuda_ranks,
    is_main_process,
    mean_over_ranks,
    world_size,
)
from pipeline.logging import SAME_ON_EVERY_RANK
from pipeline.methods.base import UnlearningMethod
from pipeline.methods.loss_math import StepTokens
from pipeline.models.peft_student import is_peft_model
from pipeline.progress import bar as progress_bar

log = logging.getLogger(__name__)

EXIT_REQUEUE = 124  # exit code after a preemption checkpoint: "requeue me" for our SLURM scripts
EXIT_INTERRUPTED = 130  # exit code after a Ctrl-C checkpoint


class NonFiniteLossError(RuntimeError):
    """A non-finite loss, gradient or weight; the message names the step and the batch rows."""


MAX_CONSECUTIVE_SKIPS = 10


class Preempted(SystemExit):
    """Checkpointed after SIGTERM / SIGUSR1: exit code 124, which our SLURM scripts requeue."""

    def __init__(self) -> None:
        super().__init__(EXIT_REQUEUE)


class StoppedOutsideTraining(SystemExit):
    """SIGTERM / SIGUSR1 / SIGUSR2 while the job was not training (loading, the teacher cache, export,
    evaluation): exit code 124 at once, as after a preemption checkpoint. What was saved stays (the
    training's checkpoints, an export, each evaluated split); the same command resumes from there."""

    def __init__(self) -> None:
        super().__init__(EXIT_REQUEUE)


SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # preemption, time limit, submitit's


def _stopping_already(signum: int, frame: Any) -> None:  # noqa: ARG001
    """A further signal once the job is stopping (train.sbatch's trap sends USR1 after a scancel's
    TERM; srun and torchrun signal again): nothing, so it cannot break into the cleanup under way."""


def stop_outside_training(signum: int, frame: Any) -> None:  # noqa: ARG001
    """The job's handler for a scheduler's signal outside training (:func:`outside_training_stops`):
    one line, then exit 124; acts once."""
    for sig in SCHEDULER_SIGNALS:
        if signal.getsignal(sig) is stop_outside_training:  # another's handler (submitit's) stays
            signal.signal(sig, _stopping_already)
    log.warning("received signal %d (%s) while not training (a preemption or cancel, or the launcher ending this "
                "rank after another failed): stopping now, exit code %d; the same command again resumes from what "
                "was saved (checkpoints, the export, evaluated splits)", signum, signal.Signals(signum).name,
                EXIT_REQUEUE)
    raise StoppedOutsideTraining()


@contextlib.contextmanager
def outside_training_stops() -> Iterator[None]:
    """While the job runs, a scheduler's signal (SIGTERM, SIGUSR1, SIGUSR2) outside training stops it
    with one line and exit code 124, where it ended the process silently (143 / 138 / 140). Only
    signals left at their default action: a handler installed before (submitit's) stays theirs.
    Training's :class:`StopSignals` takes them over while it runs and gives them back after. A rank
    blocked in a C call (a collective) acts on the signal once the call returns (``kill -9`` ends it
    at once), as during training. After the job the defaults come back, unless it is stopping."""
    ours = []
    for sig in SCHEDULER_SIGNALS:
        try:
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, stop_outside_training)
                ours.append(sig)
        except ValueError:  # not in the main thread: leave signals alone
            pass
    try:
        yield
    finally:
        for sig in ours:
            if signal.getsignal(sig) is stop_outside_training:
                signal.signal(sig, signal.SIG_DFL)


class Interrupted(SystemExit):
    """Checkpointed after Ctrl-C: exit code 130 (128 + SIGINT, the shell's convention); not requeued."""

    def __init__(self) -> None:
        super().__init__(EXIT_INTERRUPTED)


@dataclass
class TrainState:
    step: int = 0
    skipped: list[int] = field(default_factory=list)
    # fp16: steps whose update DeepSpeed's dynamic loss scaling skipped (an overflow; the scale lowered)
    overflow_skipped: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0  # the training loop's wall time up to ``step``, over every attempt
    resumed: Optional[dict] = None  # the checkpoint this attempt resumed (step tag, step, its steps' kernels)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """``trainer.warmup_ratio`` of the run's steps, rounded down (after rounding away float error:
    0.29 x 100 is 28.999..., 29 steps)."""
    return int(round(total_steps * warmup_ratio, 6))


def lr_lambda(total_steps: int, warmup_ratio: float, kind: str):
    """LambdaLR factor of step ``step`` (0-based): ``(step + 1) / warm`` over the warm-up (the first
    step trains at lr / warm, the last warm-up step at the full lr; HF's linear schedule starts at 0
    instead), then constant or a linear decay to 0 at ``total_steps``."""
    warm = warmup_steps(total_steps, warmup_ratio)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warm))
        return 1.0

    return f


class StopSignals:
    """While training: SIGTERM / SIGUSR1 / SIGUSR2 (preemption; USR2 is submitit's) and SIGINT
    (Ctrl-C) ask the loop to checkpoint at the next step boundary and exit; a second Ctrl-C stops at
    once (``KeyboardInterrupt``), also after a scheduler's signal. The previous handlers come back
    when training ends, so a signal during export or evaluation acts as outside training (one line and
    exit 124, :func:`outside_training_stops`, or a scheduler's own handler) instead of setting a
    flag nobody reads."""

    SIGNALS = (*SCHEDULER_SIGNALS, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the first stop signal received
        self.received: list[int] = []  # every scheduler signal received, in arrival order, once each
        self._ctrl_c = False
        self._previous: dict[int, Any] = {}
        self._restored = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def interrupted(self) -> bool:
        """The stop came from Ctrl-C (not from a scheduler: a Ctrl-C after a preemption signal leaves
        it a preemption, which is requeued)."""
        return self.signum == signal.SIGINT

    def hand_over(self) -> bool:
        """After the stop checkpoint: run the Python handlers that the (non-Ctrl-C) stop signals received
        had before training, in arrival order — e.g. submitit's SIGUSR2 handler, which requeues the job
        (rank 0) and exits. Without this that handler ran on arrival and requeued before any checkpoint.
        Every signal's, not only the first's: a SLURM preemption sends SIGTERM (submitit's handler for it
        only logs) before submitit's SIGUSR2, whose handler must still run. True when one ran."""
        ran = False
        if self.interrupted:  # a Ctrl-C first: the user's stop, not a scheduler's
            return False
        for signum in self.received:
            previous = self._previous.get(signum)
            # SIG_DFL / SIG_IGN / None, or the job's own exit outside training: nothing of anyone's to run
            if not callable(previous) or previous is stop_outside_training:
                continue
            log.info("passing signal %d on to the handler installed before training (%s)", signum,
                     getattr(previous, "__qualname__", previous))
            previous(signum, None)
            ran = True
        return ran

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def restore(self) -> None:
        """The signals go back to their previous handlers (idempotent): from here a signal acts as
        outside training. What arrived before stays ``requested``, for the caller's last look, and
        :meth:`hand_over` can still pass it on."""
        if self._restored:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._restored = True

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if signum == signal.SIGINT and self._ctrl_c:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if signum == signal.SIGINT:
            self._ctrl_c = True
            log.warning("Ctrl-C: will checkpoint at the next step boundary and exit (Ctrl-C again stops at once, "
                        "losing the steps since the last checkpoint)")
        else:
            log.warning("received signal %d: will checkpoint at the next step boundary and exit", signum)
        if self.signum is None:
            self.signum = signum
        if signum != signal.SIGINT and signum not in self.received:
            self.received.append(signum)


class UnlearningTrainer:
    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        engine: Any,
        reference: Optional[Any],
        method: UnlearningMethod,
        forget: list[dict],
        retain: list[dict],
        pad_token_id: int,
        plan: BatchPlan,
        total_steps: int,
        run_logger: Any,
        ckpt_meta: dict,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.engine = engine
        self.reference = reference
        self.method = method
        self.forget = forget
        self.retain = retain
        self.pad = pad_token_id
        self.plan = plan
        self.total_steps = total_steps
        self.logger = run_logger
        self.ckpt_meta = ckpt_meta
        self.ckpt_root = self.run_dir / "checkpoints"
        self.state = TrainState()
        self.resumed_from: Optional[Path] = None  # the checkpoint this attempt started from
        self._saved: Optional[tuple[int, Path]] = None  # (step, directory) of this attempt's newest checkpoint
        self._loop_start: Optional[float] = None  # perf_counter at this attempt's first step
        self._seconds_before = 0.0  # the loop's seconds of earlier attempts, up to the resumed checkpoint
        self.start_step = 0  # the step this attempt started at (steps run here: state.step - start_step)
        self.views: dict[str, Any] = {}  # method.forget_views: encoded rows, or a per-step drawn view
        self.teacher_cache: Optional[Any] = None  # method.teacher=cached: batch["forget_teacher"] rows
        # called once the resume (and its compatibility check) is done, right before the first step:
        # what this attempt really trains is settled only here (run.py writes config.yaml then)
        self.on_loop_start: Optional[Callable[[], None]] = None
        self.device = next(engine.module.parameters()).device if hasattr(engine, "module") else torch.device("cpu")
        # a LoRA student's checkpoints hold the adapters and their optimizer state only: the frozen
        # base is model.path's, reloaded by every attempt
        self.lora = is_peft_model(engine)

    # -- batches ----------------------------------------------------------------------------------
    def _collate(self, rows: list[dict], idx: list[int]) -> dict:
        return self._pad([rows[i] for i in idx])

    def _pad(self, picked: list[dict]) -> dict:
        b = pad_batch(picked, self.pad)
        return {k: v.to(self.device) for k, v in b.items()}

    def batch(self, step: int, teacher: bool = True) -> dict:
        """The batch of global micro-step ``step`` (= optimizer step x grad_accum + micro-batch);
        ``teacher=False``: without the cached teacher's rows (:meth:`step_batches` adds them on use)."""
        f_idx = self.plan.forget_indices(step)
        r_idx = self.plan.retain_indices(step)
        out = {
            "forget": self._collate(self.forget, f_idx),
            "retain": self._collate(self.retain, r_idx),
        }
        if float(getattr(self.cfg.method, "rna_noise", 0.0) or 0.0) > 0:
            # RNA noise keyed by (seed, position in the retain stream): the same for any split of the
            # optimizer step into ranks and micro-batches, and after resume
            base = int(self.cfg.seed) * 1_000_000_007
            out["retain"]["rna_seed"] = torch.tensor([base + p for p in self.plan.retain_positions(step)],
                                                     dtype=torch.long)
        for name, rows in self.views.items():  # a view drawn per use (idk_draw=per_use) encodes its draws' rows
            out[name] = (self._pad(rows.for_draws(self.plan.forget_positions(step), f_idx))
                         if hasattr(rows, "for_draws") else self._collate(rows, f_idx))
        if teacher:
            self._add_teacher(out, step)
        return out

    def _add_teacher(self, batch: dict, step: int) -> dict:
        if self.teacher_cache is not None:
            f_idx = self.plan.forget_indices(step)
            batch["forget_teacher"] = self.teacher_cache.selected(f_idx, batch["forget"]["labels"])
        return batch

    def step_batches(self, step: int, ga: int) -> Iterator[dict]:
        """Optimizer step ``step``'s ``ga`` micro-batches, each with ``batch["step_tokens"]``: every row
        group's token counts over the whole step (all micro-batches, all ranks; one all-reduce) per
        micro-batch and rank, the ``token_mean`` terms' denominator (:class:`StepTokens`). The cached
        teacher's rows (large: up to a vocabulary per loss token) are read only as each micro-batch is used."""
        batches = [self.batch(step * ga + k, teacher=False) for k in range(ga)]
        groups = [g for g in batches[0] if isinstance(batches[0][g], dict) and "labels" in batches[0][g]]
        sums = [0.0] * (3 * len(groups))
        for b in batches:
            for i, g in enumerate(groups):
                for j, c in enumerate(StepTokens.counts(b[g])):
                    sums[3 * i + j] += c
        per = float(ga * world_size())
        total = all_reduce_sum(sums)
        tokens = {g: StepTokens(*(total[3 * i + j] / per for j in range(3))) for i, g in enumerate(groups)}
        for k, b in enumerate(batches):
            b["step_tokens"] = tokens
            yield self._add_teacher(b, step * ga + k)

    # -- resume -----------------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        path = ckpt.check_resume(str(self.cfg.trainer.resume), self.ckpt_root, bool(self.cfg.model.allow_pickle))
        if path is None:
            return
        saved = ckpt.read_meta(path)
        ckpt.check_compatible(saved, self.ckpt_meta, path)
        mode = str(self.cfg.trainer.resume)
        if mode not in ("auto", "never") and path.resolve() == Path(mode).resolve() and \
                path.resolve().is_relative_to(Path(self.ckpt_root).resolve()):
            self.ckpt_meta = {**self.ckpt_meta, ckpt.ROLLED_BACK: ckpt.rollback_record(path)}  # a rollback in this run
        elif saved.get(ckpt.ROLLED_BACK):
            self.ckpt_meta = {**self.ckpt_meta, ckpt.ROLLED_BACK: saved[ckpt.ROLLED_BACK]}  # still that rollback's
        kernels = ckpt.ckpt_info("kernels")
        if saved.get(kernels) is not None and saved[kernels] != self.ckpt_meta.get(kernels):
            log.warning("resuming %s: its %d steps ran with kernels %s, this attempt runs %s (the same math; "
                        "results.json records both)", path, int(saved.get("step", 0)), saved[kernels],
                        self.ckpt_meta.get(kernels))
        self.state.resumed = {"checkpoint": ckpt.checkpoint_name(path), "step": int(saved.get("step", 0)),
                              "kernels": saved.get(kernels)}
        client = ckpt.load_checkpoint(self.engine, path, strict=not self.lora)
        self.state.step = int(client.get("step", 0))
        self.state.skipped = list(client.get("skipped", []))
        self.state.overflow_skipped = list(client.get("overflow_skipped", []))
        self.state.history = list(client.get("history", []))
        # checkpoints from before the loop's time was kept: the steps' own times are the best lower bound
        self._seconds_before = float(client.get("train_seconds", sum(h.get("step_seconds", 0.0)
                                                                         for h in self.state.history)))
        self.state.train_seconds = self._seconds_before
        rng = ckpt.load_rank_state(path)  # this rank's own RNG states (CPU, CUDA, Python)
        if rng is None and "torch_rng" in client:  # a checkpoint from before per-rank states: rank 0's CPU RNG
            rng = {"torch": client["torch_rng"]}
        if rng:
            set_rng_states(rng)
        else:
            log.warning("checkpoint %s holds no random-number states (rank_state_*.pt): the steps after it draw other "
                        "random numbers (RNA noise, dropout) than a run that was not interrupted", path,
                        extra=SAME_ON_EVERY_RANK)
        self.resumed_from = path
        log.info("resumed from %s at step %d/%d", path, self.state.step, self.total_steps)

    def save(self) -> Path:
        if not all_true(health.local_params_finite(self.engine)):
            raise NonFiniteLossError(f"weights are non-finite at step {self.state.step}: refusing to save a "
                                     f"checkpoint; the previous one stays the newest")
        self._update_seconds()
        t0 = time.perf_counter()
        client = {"step": self.state.step, "skipped": self.state.skipped,
                  "overflow_skipped": self.state.overflow_skipped, "torch_rng": torch.get_rng_state(),
                  "history": self.state.history, "train_seconds": self.state.train_seconds}
        path = ckpt.save_checkpoint(self.engine, self.ckpt_root, self.state.step, client, self.ckpt_meta,
                                    keep=int(self.cfg.trainer.keep_checkpoints), rank_state=get_rng_states(),
                                    exclude_frozen=self.lora)
        self._saved = (self.state.step, path)
        log.info("checkpoint saved: %s (%.1fs)", path, time.perf_counter() - t0)
        faults.maybe_kill("kill_after_save", self.state.step)  # fault suite: die right after a published checkpoint
        return path

    def _update_seconds(self) -> None:
        """``state.train_seconds``: earlier attempts' loop time (to the resumed checkpoint) + this one's."""
        if self._loop_start is not None:
            self.state.train_seconds = self._seconds_before + (time.perf_counter() - self._loop_start)

    # -- loop -------------------------------------------------------------------------------------
    def train(self) -> TrainState:
        self.maybe_resume()
        self.start_step = self.state.step
        if self.on_loop_start is not None:
            self.on_loop_start()
        with StopSignals() as stop:
            return self._loop(stop)

    def _loop(self, stop: StopSignals) -> TrainState:
        tcfg = self.cfg.trainer
        self.engine.train()
        if self.reference is not None:
            self.reference.eval()
        bar = progress_bar(self.cfg.logging.progress_bar, self.total_steps, f"unlearn[{self.cfg.method.name}]",
                           initial=self.state.step)
        t0 = time.time()
        self._loop_start = time.perf_counter()
        ga = max(1, int(tcfg.grad_accum))
        # fp16: the gradients are loss-scaled, and an overflow in them is DeepSpeed's to handle (it skips
        # the update and lowers the scale, routinely in the first steps at 2**16): the gradient check
        # would stop the run at the first one; a non-finite loss is still caught
        loss_scaled = bool(getattr(self.engine, "fp16_enabled", lambda: False)())
        logged_up_to = self.state.step  # the last step whose interval was logged
        while self.state.step < self.total_steps:
            # One iteration = one optimizer step = grad_accum micro-batches, so every checkpoint (taken
            # between iterations) falls on an optimizer-step boundary: no half-accumulated gradient is lost.
            step = self.state.step
            t_step = time.perf_counter()  # the step's wall time: batches, forward/backward, optimizer step
            # the LR this step trains with: engine.step() below advances the scheduler to the next one
            step_lr = float(self.engine.get_lr()[0]) if hasattr(self.engine, "get_lr") else float("nan")
            bad, bad_batch, micro_logs = None, None, []
            for k, batch in enumerate(self.step_batches(step, ga)):
                faults.maybe_raise("error_in_step", step + 1)  # fault suite: one rank fails alone
                out = self.method.compute_loss(self.engine, self.reference, batch)
                if faults.nan_loss(step + 1):
                    out.loss = out.loss * float("nan")
                if bad is None and not all_true(bool(torch.isfinite(out.loss.detach()).all())):
                    bad, bad_batch = "loss", batch
                # Backward even on a non-finite loss: DeepSpeed's accumulation bookkeeping (micro-step
                # counter, gradient partitions) stays in step; the gradients are discarded below.
                self.engine.backward(out.loss)
                micro_logs.append(dict(out.logs))
                if k == ga - 1:
                    if faults.nan_grad(step + 1):
                        health.fill_local(self.engine, "grad", float("nan"))
                    if bad is None and not loss_scaled and not all_true(health.local_grads_finite(self.engine)):
                        bad, bad_batch = "gradient", batch
                    if bad is not None:
                        self._non_finite(step, bad_batch, bad)  # raises unless nan_policy=skip
                        self._skip_optimizer_step(step)
                        break
                self._optimizer_step(step, loss_scaled)
                if loss_scaled and k == ga - 1 and not self.engine.was_step_applied():
                    self.state.overflow_skipped.append(step + 1)
                    log.info("step %d: fp16 gradient overflow: DeepSpeed skipped the update and lowered the loss "
                             "scale", step + 1)
            if bad is None and faults.nan_weights(step + 1):
                health.fill_local(self.engine, "param", float("nan"))
            self.state.step += 1
            step_seconds = round(time.perf_counter() - t_step, 6)  # (a skipped step has no history entry)
            if bad is None:  # a skipped step has no losses to log (results.json lists it in skipped_steps)
                logs = mean_over_ranks({key: sum(m[key] for m in micro_logs) / len(micro_logs)
                                        for key in micro_logs[0]})
                logs["lr"] = step_lr
                self.state.history.append({"step": self.state.step, **logs, "step_seconds": step_seconds})
                if bar is not None:
                    # refresh=False: the update below redraws it, at the bar's own interval (30 s into a
                    # file); set_postfix's default redraw would write one bar line per step into a log
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()
                                     if k in ("loss", "forget_loss", "retain_loss")}, refresh=False)
                if self.state.step % max(1, tcfg.log_every) == 0 or self.state.step == self.total_steps:
                    self._log_interval(logged_up_to, step_lr)
                    logged_up_to = self.state.step
            if bar is not None:
                bar.update(1)
            if tcfg.save_every and self.state.step % tcfg.save_every == 0 and self.state.step < self.total_steps:
                self.save()
            if not all_true(not stop.requested):
                self._stop_here(stop, bar)
        if bar is not None:
            bar.close()
        if tcfg.save_every and self.state.step > self.start_step:  # resumed at the end: that checkpoint is this one
            self.save()
        faults.maybe_signal("sigterm_after_training", self.state.step)  # fault suite: a notice after the last step
        # The handlers go back first, then the last look: a signal from here on acts as outside training, and
        # one before it (during the final save, or after the last step's look) stops here, checkpointed and
        # exit 124 -- set after the look, it was a flag nobody read: the run evaluated and exited 0.
        barrier()  # the ranks restore at about the same moment: a signal then meets one rank's training handler,
        # another's outside-training stop only in a short window (as one during the export would)
        stop.restore()
        if not all_true(not stop.requested):
            self._stop_here(stop, None)
        self._update_seconds()
        if self.start_step == self.total_steps:
            log.info("nothing to train: resumed at the last step (%d/%d)", self.start_step, self.total_steps)
        elif self.start_step:
            log.info("trained steps %d-%d of %d in %.1fs (resumed at %d)", self.start_step + 1, self.total_steps,
                     self.total_steps, time.time() - t0, self.start_step)
        else:
            log.info("trained %d step%s in %.1fs", self.total_steps, "" if self.total_steps == 1 else "s",
                     time.time() - t0)
        return self.state

    def _optimizer_step(self, step: int, loss_scaled: bool) -> None:
        """``engine.step()``; under fp16, DeepSpeed's bare exception for gradients that overflow even at
        its minimum loss scale (non-finite gradients, not a scale too high) is the run's non-finite stop."""
        try:
            self.engine.step()
        except Exception as e:  # DeepSpeed raises a plain Exception there (raise_error_at_min_scale)
            if not (loss_scaled and "loss scale already at minimum" in str(e)):
                raise
            raise NonFiniteLossError(f"non-finite gradient at step {step + 1}: fp16 gradients overflow even at "
                                     f"DeepSpeed's minimum loss scale; stopping without saving") from None

    def _log_interval(self, since: int, lr: float) -> None:
        """The losses of the steps after ``since`` up to this one, averaged (as HF Trainer logs them), with
        this step's lr: to wandb (``train/<key>``) and, on rank 0, one log line (train.log, the console)."""
        window = [h for h in self.state.history if h["step"] > since]
        if not window:
            return
        keys = [k for k in window[-1] if k not in ("step", "lr", "step_seconds") and all(k in h for h in window)]
        means = {k: sum(h[k] for h in window) / len(window) for k in keys}
        self.logger.log({f"train/{k}": v for k, v in {**means, "lr": lr}.items()}, step=self.state.step)
        if is_main_process():
            shown = ", ".join(f"{k} {means[k]:.4g}" for k in sorted(means, key=lambda k: k != "loss"))
            over = f" (mean of steps {window[0]['step']}-{self.state.step})" if len(window) > 1 else ""
            log.info("step %d/%d: %s%s, lr %.3g", self.state.step, self.total_steps, shown, over, lr)

    def _stop_here(self, stop: StopSignals, bar: Optional[Any]) -> NoReturn:
        """A stop signal reached some rank: checkpoint this step on every rank and exit. Ctrl-C on
        any rank makes it an interruption (exit 130), else a preemption (exit 124, requeued; under
        submitit its own SIGUSR2 handler then requeues, :meth:`StopSignals.hand_over`). A checkpoint
        of this step saved just before (``save_every``, the final one) is not written again."""
        path = self._saved[1] if self._saved is not None and self._saved[0] == self.state.step else self.save()
        if bar is not None:
            bar.close()
        if not all_true(not stop.interrupted):
            log.warning("interrupted at step %d: checkpoint saved in %s; run the same command again to resume "
                        "(exit code %d)", self.state.step, path, EXIT_INTERRUPTED)
            raise Interrupted()
        log.warning("preempted at step %d: checkpoint saved, exiting with code %d", self.state.step, EXIT_REQUEUE)
        stop.hand_over()
        raise Preempted()

    def _skip_optimizer_step(self, step: int) -> None:
        """Discard this optimizer step: weights, Adam moments and the learning-rate schedule stay as they are.

        ZeRO stages 1-3: DeepSpeed's optimizers already skip an update whose gradient norm is not
        finite (the fp16 overflow path: no optimizer step, no scheduler step, gradients cleared, the
        engine's micro-step bookkeeping advanced), so every rank's gradient is made non-finite and
        ``engine.step()`` is called. Without ZeRO (plain torch optimizer, which would step on NaN) the
        gradients are dropped and ``engine.step()`` is not called; only the engine's micro-step
        counter is advanced, as its ``step()`` would, so the accumulation boundaries stay aligned.
        """
        eng = self.engine
        stage = int(eng.zero_optimization_stage()) if hasattr(eng, "zero_optimization_stage") else 0
        if stage >= 1:
            health.fill_local(eng, "grad", float("nan"))
            eng.step()
            if eng.was_step_applied():
                raise NonFiniteLossError(f"step {step + 1}: DeepSpeed applied an update that should have been "
                                         f"skipped (trainer.nan_policy=skip); stopping")
            return
        eng.zero_grad()
        if hasattr(eng, "micro_steps"):
            eng.micro_steps += 1

    def _non_finite(self, step: int, batch: dict, what: str) -> None:
        ids = {k: batch[k]["index"].tolist() for k in ("forget", "retain") if "index" in batch[k]}
        msg = (f"non-finite {what} at step {step + 1} (forget rows {ids.get('forget')}, "
               f"retain rows {ids.get('retain')})")
        if self.cfg.trainer.nan_policy == "skip":
            self.state.skipped.append(step + 1)
            recent = self.state.skipped[-MAX_CONSECUTIVE_SKIPS:]
            if len(recent) == MAX_CONSECUTIVE_SKIPS and recent[-1] - recent[0] == MAX_CONSECUTIVE_SKIPS - 1:
                raise NonFiniteLossError(f"{msg}: {MAX_CONSECUTIVE_SKIPS} consecutive non-finite steps, giving up "
                                         f"(the weights are likely corrupted); the last checkpoint is kept")
            log.warning("%s: skipping the step (trainer.nan_policy=skip)", msg)
            return
        raise NonFiniteLossError(f"{msg}; stopping without saving (trainer.nan_policy=stop)")


def get_rng_states() -> dict:
    """This process's RNG states: torch CPU, this rank's CUDA device (when present) and Python's
    ``random``. Only the rank's own device: a resume may see another number of GPUs per process."""
    import random

    out: dict = {"torch": torch.get_rng_state(), "python": random.getstate()}
    # cuda_ranks, not torch.cuda.is_available(): CPU ranks on a GPU host (DS_ACCELERATOR=cpu) would
    # each open a CUDA context on GPU 0 to save a state the run never uses
    if cuda_ranks():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_states(states: dict) -> None:
    """Restore what :func:`get_rng_states` returned (CUDA states only where CUDA is present)."""
    import random

    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "python" in states:
        random.setstate(states["python"])
    if "cuda" in states and cuda_ranks():
        cuda = states["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints before this release saved every device's
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def check_finite_params(module: torch.nn.Module) -> bool:
    return all(math.isfinite(float(p.detach().float().abs().sum())) for p in module.parameters() if p.numel())
