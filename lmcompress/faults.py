"""Faults during long runs: checkpoints complete or absent, preemption (SIGTERM), non-finite losses.

Every decision that ends or changes a step is taken by all ranks together (one small all-reduce per step), so
no rank leaves a collective that the others still wait in.
"""
import contextlib
import os
import re
import signal
import sys

import torch
from transformers import TrainerCallback, TrainerState
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .atomic import remove_folder, remove_stale_staging, replace_folder, staging_path
from .coupling import save_training_args
from .distributed import wait_for_everyone
from .errors import UserError, removed_on_failure

# Written by the Trainer after the weights, optimizer and RNG states. The plain Trainer writes checkpoints in place,
# so a checkpoint-N without it was cut short and is never resumed from.
TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped early on purpose, re-run to continue


# ---- Checkpoints: complete or absent -------------------------------------------------------------------------

def checkpoint_step(path):
    match = CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def complete_checkpoints(folder):
    """``checkpoint-N`` folders of ``folder`` that hold a trainer state, oldest step first."""
    if not os.path.isdir(folder):
        return []
    found = [os.path.join(folder, name) for name in os.listdir(folder) if checkpoint_step(name) is not None]
    complete = [path for path in found if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME))]
    return sorted(complete, key=checkpoint_step)


def latest_complete_checkpoint(folder):
    checkpoints = complete_checkpoints(folder)
    return checkpoints[-1] if checkpoints else None


def staging_root(run_dir, step):
    """Where every rank writes checkpoint ``step`` before it is renamed into place: the same path on all ranks."""
    return staging_path(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}"))


def rotate_checkpoints(run_dir, save_total_limit, newest, best=None):
    """Keep at most ``save_total_limit`` complete checkpoints; never delete ``newest`` (just saved) nor ``best``."""
    if not save_total_limit or save_total_limit <= 0:
        return
    protected = {os.path.normpath(path) for path in (newest, best) if path}
    checkpoints = complete_checkpoints(run_dir)
    excess = len(checkpoints) - max(save_total_limit, len(protected))
    for path in checkpoints:
        if excess <= 0:
            break
        if os.path.normpath(path) not in protected:
            remove_folder(path)
            excess -= 1


def save_failure_message(folder, what):
    """The one line for a save into ``folder`` that the file system stopped (full disk...): what was kept."""

    def message(cause):
        last_checkpoint = latest_complete_checkpoint(folder)
        kept = f"the last complete checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was kept"
        return (f"could not save {what} in {folder}: {cause}; {kept}; free space and re-run with "
                "--resume_from_checkpoint auto")

    return message


class StagedCheckpoints(TrainerCallback):
    """Checkpoints complete or absent: all ranks write ``checkpoint-N`` into one staging folder, renamed into place
    once every rank is done; then the oldest beyond ``--save_total_limit`` go, never the newest nor the best.

    The Trainer writes a checkpoint under ``args.output_dir`` as it is when it saves, and calls ``on_save`` once the
    checkpoint is whole: from the end of a step that will save until then, ``args.output_dir`` is the staging
    folder. Register this after every callback that may ask for a save at the end of a step.
    """

    def __init__(self):
        self.run_dir = None  # the real output folder, while a save is staged
        self.name = None

    def on_step_end(self, args, state, control, **kwargs):
        self.stage_if_saving(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.stage_if_saving(args, state, control)

    def stage_if_saving(self, args, state, control):
        self.unstage(args)
        # Under --save_strategy best the Trainer decides whether to save only after evaluating.
        if not (control.should_save or (control.should_evaluate and args.save_strategy == "best")):
            return
        if args.should_save:
            remove_stale_staging(args.output_dir)
        wait_for_everyone()
        self.run_dir, self.name = args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        args.output_dir = staging_root(self.run_dir, state.global_step)

    def unstage(self, args):
        """Point ``args.output_dir`` back at the output folder; return the staging folder (None if none was set)."""
        if self.run_dir is None:
            return None
        staging, args.output_dir, self.run_dir = args.output_dir, self.run_dir, None
        return staging

    def on_save(self, args, state, control, **kwargs):
        run_dir = self.run_dir
        staging = self.unstage(args)
        if staging is None:
            raise RuntimeError("the Trainer saved a checkpoint that was not staged: a callback registered after "
                               "StagedCheckpoints asked for it")
        staged, final = os.path.join(staging, self.name), os.path.join(run_dir, self.name)
        if args.should_save:
            if not os.path.isfile(os.path.join(staged, TRAINER_STATE_NAME)):
                raise RuntimeError(f"the Trainer did not write {self.name} under args.output_dir ({staging}): this "
                                   "transformers saves elsewhere; see the README's 'Coupling to transformers'")
            save_training_args(args, staged)  # the Trainer saved the staging output_dir
        if state.best_model_checkpoint == staged:
            state.best_model_checkpoint = final
            if args.should_save:
                state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        wait_for_everyone()
        if args.should_save:
            replace_folder(staged, final)
            remove_stale_staging(run_dir)
            rotate_checkpoints(run_dir, args.save_total_limit, final, state.best_model_checkpoint)

    def on_train_end(self, args, state, control, **kwargs):
        self.unstage(args)

    @contextlib.contextmanager
    def failed_save_reported(self, args):
        """Around ``train()``: a save that fails leaves no staging folder behind, and when the file system stopped
        it (a full disk...) the failure is one line naming the checkpoint that was kept."""
        try:
            yield
        except Exception:
            run_dir = self.run_dir
            staging = self.unstage(args)
            if staging is None:
                raise
            with removed_on_failure(staging, run_dir, save_failure_message(run_dir, self.name)):
                raise


# ---- Agreement between ranks ---------------------------------------------------------------------------------

def ranks_where(flag, args):
    """The ranks on which ``flag`` is true (every rank must call this at the same point)."""
    if args.world_size == 1 or not torch.distributed.is_initialized():
        return [0] if flag else []
    flags = torch.zeros(args.world_size, device=args.device)
    flags[args.process_index] = float(flag)
    torch.distributed.all_reduce(flags)
    return [rank for rank, value in enumerate(flags.tolist()) if value]


# ---- Preemption ----------------------------------------------------------------------------------------------

class PreemptionCallback(TrainerCallback):
    """On SIGTERM, save a checkpoint at the next step boundary and stop training (all ranks together)."""

    def __init__(self):
        self.signalled = False
        self.preempted_at = None
        self._previous_handler = None

    def _on_sigterm(self, signum, frame):
        self.signalled = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_step_end(self, args, state, control, **kwargs):
        if ranks_where(self.signalled, args):
            self.preempted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


def exit_if_preempted(trainer, preemption):
    """After ``train()``: a preempted run skips the final model and evaluation and exits ``EXIT_PREEMPTED``."""
    if preemption.preempted_at is None:
        return
    if trainer.is_world_process_zero():
        script = os.path.basename(sys.argv[0]) or "lmcompress"
        print(f"{script}: preempted (SIGTERM): saved {PREFIX_CHECKPOINT_DIR}-{preemption.preempted_at} in "
              f"{trainer.args.output_dir}; re-run with --resume_from_checkpoint auto to continue",
              file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)


# ---- Non-finite losses ---------------------------------------------------------------------------------------

class NonFiniteLoss(UserError):
    """A NaN or infinite training loss, on some rank."""


class NonFiniteGuard(TrainerCallback):
    """Checks every micro-batch's loss; before each optimiser step the ranks agree whether any was non-finite.

    Then all ranks stop with ``NonFiniteLoss`` naming the step, or, with ``skip``, drop the step's gradients so
    the optimiser leaves the weights as they were, and count it.
    """

    def __init__(self, skip=False):
        self.skip = skip
        self.skipped = 0
        self._nonfinite = None  # on the device: read once per optimiser step, not once per micro-batch

    def observe(self, loss):
        nonfinite = ~torch.isfinite(loss.detach()).all()
        self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite | nonfinite

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        seen = self._nonfinite is not None and bool(self._nonfinite)
        self._nonfinite = None
        bad_ranks = ranks_where(seen, args)
        if not bad_ranks:
            return
        step = state.global_step + 1
        where = f"rank{'s' if len(bad_ranks) > 1 else ''} {', '.join(map(str, bad_ranks))}"
        if not self.skip:
            raise NonFiniteLoss(f"non-finite training loss at step {step} on {where}; the last checkpoint holds the "
                                "weights before it; lower --learning_rate, use --bf16 instead of --fp16, or pass "
                                "--skip_nonfinite to skip such steps")
        model.zero_grad(set_to_none=True)
        self.skipped += 1
        if args.process_index == 0:
            print(f"warning: non-finite training loss at step {step} on {where}: step skipped "
                  f"({self.skipped} so far)", file=sys.stderr, flush=True)


# ---- Logs that survive a resume ------------------------------------------------------------------------------

def resumed_step(checkpoint):
    """The step of the checkpoint a run resumes from, read from its trainer state (0 for a fresh run)."""
    path = os.path.join(checkpoint, TRAINER_STATE_NAME) if isinstance(checkpoint, str) else None
    if path is None or not os.path.isfile(path):
        return 0
    return TrainerState.load_from_json(path).global_step


class ResumableTensorBoardCallback(TensorBoardCallback):
    """TensorBoard events through training and the evaluation after it, all in one folder, from ``writer``."""

    def __init__(self, writer):
        super().__init__(tb_writer=writer)
        self.writer = writer

    def on_train_end(self, args, state, control, **kwargs):
        # The base class would close the writer, and the evaluation after training open one in another folder.
        if self.writer is not None:
            self.writer.flush()


def use_resumable_tensorboard(trainer, resume_from_checkpoint):
    """Swap the Trainer's TensorBoard callback (when ``report_to`` has it) for one writing to
    ``$TENSORBOARD_LOGGING_DIR`` or else ``output_dir/runs``. Resumed, it purges the events that the interrupted
    run wrote after the checkpoint, so that every step appears once (TensorBoard hides earlier files' events at or
    after ``purge_step``; those of the checkpoint's own step were logged before it was saved)."""
    if trainer.pop_callback(TensorBoardCallback) is None:
        return
    writer = None
    if trainer.is_world_process_zero():
        from torch.utils.tensorboard import SummaryWriter

        logging_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(trainer.args.output_dir, "runs")
        step = resumed_step(resume_from_checkpoint)
        writer = SummaryWriter(os.path.expanduser(logging_dir), purge_step=step + 1 if step else None)
    trainer.add_callback(ResumableTensorBoardCallback(writer))
