"""Atomic, resumable DeepSpeed checkpoints.

Layout under ``<run_dir>/checkpoints``::

    step_00000040/          complete checkpoint (DeepSpeed shards + meta.json)
    step_00000080.partial/  being written; never read
    .replaced-step_00000040/  a published checkpoint moved aside while its step is saved again
                            (read in its place if that save was cut off; the next save tidies it)
    latest                  name of the newest complete checkpoint, written last (atomic rename)

DeepSpeed writes the shards of every rank into ``<tag>.partial``; only after all ranks finished
(barrier) does rank 0 write ``meta.json``, rename the directory to its final name and then update
``latest``. A crash at any point leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from pipeline.engine.distributed import barrier, is_main_process
from pipeline.io import atomic_write_text, tree_bytes
from pipeline.messages import first_line

log = logging.getLogger(__name__)

PARTIAL = ".partial"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or resumed. ``every_rank``: every rank decides it alike
    from the same shared files (a refused resume), so rank 0's line speaks for all
    (:func:`pipeline.errors.exit_with`)."""

    def __init__(self, message: str = "", *, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _rank_file(rank: int) -> str:
    return f"rank_state_{rank:05d}.pt"


@contextlib.contextmanager
def _frozen_left_out(module: Any) -> Iterator[None]:
    """While saving: the module's state dict without any frozen tensor, under every name it has.

    DeepSpeed's ``exclude_frozen_parameters`` walks ``named_parameters()``, which lists a tied tensor
    once: a frozen input embedding tied to ``lm_head`` stayed in every LoRA checkpoint as
    ``lm_head.weight`` (on one rank, stage 0: 137 MB per save of SmolLM2-135M beside its 9 MB of adapters).
    """
    frozen = {id(p) for p in module.parameters() if not p.requires_grad}
    names = [n for n, p in module.named_parameters(remove_duplicate=False) if id(p) in frozen]

    def drop(_module: Any, state: dict, prefix: str, _meta: Any) -> None:
        for n in names:
            state.pop(prefix + n, None)

    handle = module.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def save_checkpoint(engine: Any, root: str | Path, step: int, client_state: dict, meta: dict, keep: int = 2,
                    rank_state: Optional[dict] = None, exclude_frozen: bool = False) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    ``client_state`` is saved once (DeepSpeed writes rank 0's); ``rank_state`` (e.g. RNG states, which
    differ per rank) goes to one small file per rank, read back by :func:`load_rank_state`.
    ``exclude_frozen``: leave out parameters that do not train (a LoRA student's base, reloaded from
    ``model.path`` on resume: ~13 GiB less per save at 7B); load it with ``strict=False``.
    """
    root = Path(root)
    tag = _tag(step)
    final = root / tag
    partial_tag = tag + PARTIAL
    aside = root / (REPLACED + tag)
    if is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        if (root / partial_tag).exists():
            shutil.rmtree(root / partial_tag)
        _settle_replaced(root, quiet=True)
    barrier()
    renamed = False  # whether this save put a new directory at ``final`` (only that one is undone on failure)
    _check_shared(root)
    try:
        with _frozen_left_out(engine.module) if exclude_frozen else contextlib.nullcontext():
            engine.save_checkpoint(str(root), tag=partial_tag, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=exclude_frozen)
        if rank_state is not None:
            import torch

            torch.save(rank_state, root / partial_tag / _rank_file(_rank()))
        from pipeline.engine import faults

        faults.maybe_kill("kill_in_save", step)  # fault suite: a rank dies after writing its shards
        faults.maybe_signal("sigterm_in_save", step)  # fault suite: a preemption notice during the save
        faults.maybe_fail_write("enospc_in_save", step)  # fault suite: one rank's write fails
        barrier()
        if is_main_process():
            # save_id: this save, among saves of the same step (a run trained again in its directory)
            record = {**meta, "step": step, "tag": tag, SAVE_ID: uuid.uuid4().hex}
            atomic_write_text(root / partial_tag / META, json.dumps(record, indent=2, sort_keys=True))
            if final.exists():
                # the same step saved again (a resume at the last step, resume=never in a used run): the
                # published one moves aside, not away, until the new one is in place (latest_checkpoint
                # reads it there meanwhile: a kill in between leaves a complete checkpoint)
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(final, aside)
            os.replace(root / partial_tag, final)
            renamed = True
            atomic_write_text(root / "latest", tag)  # written last: readers only ever see complete checkpoints
            shutil.rmtree(aside, ignore_errors=True)
            _prune(root, keep, step)
    except (OSError, RuntimeError) as exc:  # disk full (torch.save raises RuntimeError), quota, permissions
        if is_main_process():  # the shared directory is rank 0's: others may still be writing into it
            shutil.rmtree(root / partial_tag, ignore_errors=True)
            ptr = root / "latest"
            if renamed and not (ptr.exists() and ptr.read_text().strip() == tag):
                shutil.rmtree(final, ignore_errors=True)  # renamed but never published: not a checkpoint
            _settle_replaced(root, quiet=True)  # the earlier save of this step, if moved aside, comes back
        prev = latest_checkpoint(root)
        cause = (f"another rank failed while writing it (that rank's error says why; here: {exc})" if _peer_gone(exc)
                 else f"{exc}{_disk_full_note(root, prev, str(exc))}")
        raise CheckpointError(
            f"could not write checkpoint {tag} to {root}: {cause}. The previous checkpoint "
            f"({prev.name if prev else 'none'}) is intact and remains the newest"
        ) from exc
    barrier()
    return final


def _check_shared(root: Path) -> None:
    """Every rank must see the directory rank 0 created: shards of all nodes are renamed together by
    rank 0, so a node-local ``output_dir`` would leave other nodes' shards behind unpublished."""
    from pipeline.engine.distributed import all_true

    if not all_true(root.is_dir()):
        raise CheckpointError(
            f"checkpoint directory {root} created by rank 0 is not visible on every rank "
            f"(rank {os.environ.get('RANK', '0')} sees it: {root.is_dir()}): with several nodes, output_dir must be "
            f"on a filesystem shared by all nodes")


def _peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is this rank's collective failing because another rank left (gloo raises a
    plain RuntimeError naming the closed connection; NCCL a DistError) rather than its own write."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or "Connection closed by peer" in text or \
        "remote worker" in text


def _disk_full_note(root: Path, prev: Optional[Path], error: str) -> str:
    """Name a full disk even when the writer's own error does not (torch's zip writer reports only
    'unexpected pos' when a write comes up short)."""
    if "No space left" in error or prev is None:
        return ""
    try:
        free = shutil.disk_usage(root).free
        need = tree_bytes(prev)
    except OSError:
        return ""
    if free >= need:
        return ""
    return f" (No space left on device: {free // 1024} KiB free, a checkpoint takes ~{need // 1024} KiB)"


def complete_checkpoints(root: Path) -> list[Path]:
    """The published checkpoints under ``root`` (not ``.partial``, with their meta), oldest first
    (zero-padded tags sort as their steps)."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL) and (p / META).exists())


def _prune(root: Path, keep: int, step: int) -> None:
    """Keep the checkpoint of ``step`` (just published) and the ``keep - 1`` newest before it. Later
    steps are another run's (``trainer.resume=never`` in a used run directory) and are left alone:
    by step number alone the one just written would go."""
    if keep <= 0:
        return
    done = complete_checkpoints(root)
    older = [p for p in done if p.name < _tag(step)]  # zero-padded tags sort as their steps
    for p in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


# Prefix of a published checkpoint moved aside while the same step is saved again (save_checkpoint).
REPLACED = ".replaced-"


def checkpoint_name(path: Path) -> str:
    """A checkpoint's step tag, also for one read where a cut-off save left it (:data:`REPLACED`)."""
    return path.name.removeprefix(REPLACED)


def _settle_replaced(root: Path, quiet: bool = False) -> None:
    """Rank 0: a checkpoint moved aside by a save that did not finish goes back where it was; one whose
    step was published again since is removed. ``quiet``: a filesystem error is a warning (this is
    tidying; latest_checkpoint reads a checkpoint left aside as it is)."""
    try:
        for old in root.glob(REPLACED + "step_*"):
            final = root / old.name[len(REPLACED):]
            if (final / META).exists():
                shutil.rmtree(old, ignore_errors=True)
            elif (old / META).exists():
                if final.exists():
                    shutil.rmtree(final, ignore_errors=True)
                os.replace(old, final)
    except OSError as exc:
        if not quiet:
            raise
        log.warning("checkpoints in %s: could not put a checkpoint moved aside back in place (%s); it is read "
                    "where it is", root, exc)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest *complete* checkpoint (``latest`` pointer, else a scan), or None. A published
    checkpoint moved aside by a save of its step cut off midway (:data:`REPLACED`) still counts."""
    root = Path(root)
    if not root.exists():
        return None
    ptr = root / "latest"
    if ptr.exists():
        name = ptr.read_text().strip()
        for cand in (root / name, root / (REPLACED + name)):
            if (cand / META).exists():
                return cand
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resume_target(mode: str, root: str | Path) -> Optional[Path]:
    """The checkpoint ``trainer.resume=<mode>`` resumes from, for a run whose checkpoints go to
    ``root``: ``never`` none; ``auto`` the run's newest complete one; a path that one (a path that does
    not exist is a :class:`CheckpointError`) — unless it lies outside ``root`` and this run has
    checkpoints of its own: an earlier attempt started from that
    path and trained on, so a requeued attempt continues from its own newest (before, every attempt
    went back to the path and trained the same steps again); likewise a path inside ``root`` (a
    rollback) that an attempt of the same submission already rolled back to (:func:`rollback_record`)."""
    if mode == "never":
        return None
    own = latest_checkpoint(root)
    if mode == "auto":
        return own
    path = Path(mode)
    if own is not None and path.exists() and not path.resolve().is_relative_to(Path(root).resolve()):
        log.info("trainer.resume=%s: this run has checkpoints of its own since (an earlier attempt started from "
                 "that path); resuming from its newest, %s", mode, own)
        return own
    if own is not None and own.resolve() != path.resolve() and _rolled_back_to(own) == rollback_record(path):
        # a path of this very run (a rollback): an attempt of this same submission rolled back there
        # and trained on, and its checkpoints say so; its requeue (same command, same job) continues
        # from the newest instead of rolling back again (and failing for good once keep_checkpoints
        # pruned the path). A new submission that names the path rolls back again.
        log.warning("trainer.resume=%s: this job rolled back there in an earlier attempt and has trained on "
                    "since; resuming from its newest, %s (a new submission rolls back again)", mode, own)
        return own
    if not path.exists():  # a typo (trainer.resume=nver, a mistyped path) resumed this run's own newest
        # not guessed: a start pruned since (this run trained on from it: trainer.resume=auto continues)
        # and a mistyped rollback look alike here
        hint = (f"; this run has checkpoints of its own (newest {own.name}): trainer.resume=auto continues from "
                f"them" if own is not None else "")
        raise CheckpointError(f"trainer.resume={mode}: no such checkpoint directory (allowed: auto, never, or the "
                              f"path of a checkpoint){hint}", every_rank=True)
    return path


def rollback_record(path: Path) -> dict:
    """What checkpoints trained after a rollback to ``path`` record (:data:`ROLLED_BACK`): its step tag
    and the submission that rolled back (SLURM keeps a job's id across its requeues; outside SLURM,
    None: a re-run of the same command is that submission's requeue)."""
    return {"tag": checkpoint_name(path), "job": os.environ.get("SLURM_JOB_ID")}


def _rolled_back_to(ckpt: Path) -> Optional[dict]:
    try:
        return read_meta(ckpt).get(ROLLED_BACK)
    except (OSError, ValueError):
        return None


def check_resume(mode: str, root: str | Path, allow_pickle: bool) -> Optional[Path]:
    """The checkpoint ``trainer.resume=<mode>`` resumes from (:func:`resume_target`), checked before
    any model is loaded: a complete checkpoint, and one made elsewhere only with
    ``model.allow_pickle=true`` — DeepSpeed reads its files with ``torch.load(weights_only=False)``,
    which runs whatever code a pickle holds. This run's own checkpoints are its own writing."""
    path = resume_target(mode, root)
    if path is None:
        return None
    if not (path / META).exists():
        raise CheckpointError(f"trainer.resume={mode}: {path} is not a complete checkpoint (no {META})", every_rank=True)
    if not allow_pickle and not path.resolve().is_relative_to(Path(root).resolve()):
        raise CheckpointError(
            f"trainer.resume={mode}: a checkpoint made outside this run; DeepSpeed loads its files as pickles "
            f"(torch.load with weights_only=False), which runs any code they hold. If you trust where it came "
            f"from, set model.allow_pickle=true", every_rank=True)
    # a copy or a disk cut short: named here, before any model loads (DeepSpeed stopped on it with an
    # AssertionError or a JSONDecodeError traceback after the engines were built)
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"trainer.resume={mode}: {path / META} is not readable JSON ({first_line(e)}): a damaged "
                              f"copy?{_earlier_hint(path)}", every_rank=True) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"trainer.resume={mode}: {path / META} holds a JSON {type(meta).__name__}, not an "
                              f"object: a damaged copy?{_earlier_hint(path)}", every_rank=True)
    missing = missing_files(path, meta)
    if missing:
        raise CheckpointError(f"trainer.resume={mode}: checkpoint {path} lacks {len(missing)} file(s) its "
                              f"{int(meta.get('world_size', 1))} rank(s) wrote ({', '.join(missing[:3])}"
                              f"{', ...' if len(missing) > 3 else ''}): a copy or write cut short?{_earlier_hint(path)}",
                              every_rank=True)
    return path


def missing_files(ckpt: Path, meta: dict) -> list[str]:
    """The files of checkpoint ``ckpt`` (saved as ``meta`` says: its ranks and ZeRO stage) that are not
    there: DeepSpeed's model states (ZeRO-3: one per rank), its optimizer states per rank (ZeRO stages
    1-3 and bf16 at stage 0, whose names may carry a ``bf16_`` prefix) and this pipeline's RNG states
    per rank (a checkpoint saved before they were written has none at all)."""
    names = {f.name for f in ckpt.iterdir()}
    world, stage = int(meta.get("world_size", 1)), int(meta.get("zero_stage", META_DEFAULTS["zero_stage"]))
    per_rank = range(world)
    want = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in per_rank] if stage == 3
            else ["mp_rank_00_model_states.pt"])
    missing = [n for n in want if n not in names]
    if stage > 0 or any(n.endswith("_optim_states.pt") for n in names):
        optim = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in per_rank]
        missing += [n for n in optim if not any(have.endswith(n) for have in names)]
    if any(n.startswith("rank_state_") for n in names):
        missing += [_rank_file(r) for r in per_rank if _rank_file(r) not in names]
    return missing


def _earlier_hint(ckpt: Path) -> str:
    earlier = [c for c in complete_checkpoints(ckpt.parent) if c.name < checkpoint_name(ckpt)]
    return (f" Resume from an earlier one (trainer.resume={earlier[-1]}) or start over (trainer.resume=never)" if earlier
            else " Start over (trainer.resume=never)")


# Prefix of meta fields that are recorded, not compared on resume (e.g. the kernels the steps ran with).
INFO_PREFIX = "info."


def ckpt_info(name: str) -> str:
    """The meta field ``name`` recorded for information only (:data:`INFO_PREFIX`)."""
    return INFO_PREFIX + name


# a random id per save: tells two checkpoints of one step apart (the tag names the step only)
SAVE_ID = ckpt_info("save_id")


def save_id(ckpt: str | Path) -> Optional[str]:
    """The :data:`SAVE_ID` of checkpoint ``ckpt`` (None for one saved before it was recorded)."""
    return read_meta(ckpt).get(SAVE_ID)


# Meta field of checkpoints trained on after ``trainer.resume=<a checkpoint of this run>``: that
# checkpoint's tag and the submission (rollback_record; resume_target: its requeue does not roll back
# again). Not compared on resume.
ROLLED_BACK = "rolled_back_to"


def read_meta(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / META).read_text())


# Meta fields added after checkpoints without them were written, and the value those checkpoints had:
# before deepspeed.zero_stage=auto every run used ZeRO-3.
# fields added after checkpoints were already written, as those runs had them
META_DEFAULTS = {"zero_stage": 3, "training.model.chat_template_kwargs": {}}
# fields added later whose earlier value is unknown: compared only when the checkpoint has them
RECORDED_LATER = ("rows.forget", "rows.retain", "tau_chosen", "model.content_sha256", "model.code_sha256")
# fields no longer recorded: a checkpoint's value is not compared when the current meta has none.
# model.files_sha256 hashed the model files' mtimes (a model re-staged to scratch by a requeued job
# was refused); model.content_sha256 replaced it. trainer.nan_policy decides only what happens at a
# non-finite step, not the steps a checkpoint holds: a run stopped by a NaN resumes with nan_policy=skip
RETIRED = ("model.files_sha256", "training.trainer.nan_policy")


# model.peft settings that decide only the export (the dtype the adapters are merged into for model/), no
# training step: not compared, so a finished LoRA run resumes at its last step to be exported again
PEFT_EXPORT_ONLY = ("merged_dtype",)


def peft_meta(peft: dict) -> str:
    """The ``peft`` meta field: the LoRA settings the checkpoint's steps depend on."""
    return json.dumps({k: v for k, v in peft.items() if k not in PEFT_EXPORT_ONLY}, sort_keys=True)


def check_compatible(saved: dict, current: dict, ckpt: Path) -> None:
    """Refuse to resume from a checkpoint made with a different model/method/data configuration, other
    training settings (``training.*``: lr, schedule, step count, batching, sequence length, prompt
    format, precision) or another ZeRO stage (its files are laid out differently and DeepSpeed cannot
    read one as the other)."""
    # checkpoints written before the training settings were recorded cannot be compared on them
    unknown = set() if any(k.startswith("training.") for k in saved) else {k for k in current if k.startswith("training.")}
    unknown |= {k for k in RECORDED_LATER if k not in saved} | {k for k in RETIRED if k not in current}
    unknown.discard("training.draws")  # absent from every checkpoint written before it: compared even there
    saved = {**{k: v for k, v in META_DEFAULTS.items() if k in current}, **saved}
    if isinstance(saved.get("peft"), str):  # checkpoints written before PEFT_EXPORT_ONLY recorded them too
        saved["peft"] = peft_meta(json.loads(saved["peft"]))
    diffs = [k for k in sorted(set(saved) | set(current))
             if k not in ("step", "tag", ROLLED_BACK) and not k.startswith(INFO_PREFIX) and k not in unknown
             and saved.get(k) != current.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: checkpoint={saved.get(k)!r} now={current.get(k)!r}" for k in diffs)
        hint = (f" To resume it, set deepspeed.zero_stage={saved['zero_stage']}."
                if diffs == ["zero_stage"] else "")
        if "training.draws" in diffs and "training.draws" not in saved and not {"method", "training.trainer.grad_accum"} & set(diffs):
            hint = (" It was written by an earlier version, which cut epochs per micro-batch and keyed RNA noise "
                    "and per-use refusals by micro-batch: resumed now, it would train other rows.")
        if "world_size" in diffs:  # the root cause of a changed stage or grad_accum as well (a requeue on other GPUs)
            n = saved.get("world_size")
            hint = (f" It was written by {n} rank{'' if n == 1 else 's'} (DeepSpeed lays a checkpoint out for the "
                    f"ranks that wrote it): to resume it, launch {n} rank{'' if n == 1 else 's'}.")
        raise CheckpointError(
            f"checkpoint {ckpt} was made with a different configuration ({detail}).{hint} "
            f"Use trainer.resume=never or a fresh run_name to start over.", every_rank=True)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def load_rank_state(ckpt: str | Path) -> Optional[dict]:
    """This rank's ``rank_state`` from :func:`save_checkpoint`, or None when the checkpoint has none."""
    path = Path(ckpt) / _rank_file(_rank())
    if not path.exists():
        return None
    import torch

    try:
        # weights_only: tensors and plain containers only (RNG states are uint8 tensors and int tuples)
        return torch.load(path, map_location="cpu", weights_only=True)
    except DAMAGED_FILE_ERRORS as e:
        raise CheckpointError(_unreadable(Path(ckpt), e)) from e


# what torch.load / DeepSpeed raise for a checkpoint file cut short or damaged (a pickle stream that
# ends early: IndexError or EOFError; AssertionError: DeepSpeed's check of the files it expects)
DAMAGED_FILE_ERRORS = (RuntimeError, OSError, EOFError, IndexError, ValueError, AssertionError, pickle.UnpicklingError)


def _unreadable(ckpt: Path, e: BaseException) -> str:
    return (f"checkpoint {ckpt} cannot be read ({type(e).__name__}: {first_line(e, 200)}): a write cut short, a "
            f"damaged copy, or not a checkpoint of this configuration?{_earlier_hint(ckpt)}")


def load_checkpoint(engine: Any, ckpt: str | Path, strict: bool = True) -> dict:
    """Load model/optimizer/scheduler state; returns the client state (step, RNG, ...). ``strict=False``
    for a checkpoint saved with ``exclude_frozen`` (the frozen weights stay as loaded from the model)."""
    ckpt = Path(ckpt)
    try:
        path, state = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=strict)
    except DAMAGED_FILE_ERRORS as e:
        raise CheckpointError(_unreadable(ckpt, e)) from e
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt}")
    return state or {}
