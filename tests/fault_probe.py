"""Run train.py or distiller.py (the first argument: train | distil) with faults injected for the tests.

Environment variables choose the faults:
  FAULT_KILL_IN_SAVE=N     SIGKILL this process in the middle of writing checkpoint-N (weights and optimizer
                           written, RNG and trainer state not yet).
  FAULT_NAN_AT_STEP=N      make the loss of optimiser step N NaN, on rank FAULT_NAN_RANK (default 0).
  FAULT_PID_DIR=DIR        write this process's pid to DIR/rank{R}.pid once training starts.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Trainer, TrainerCallback  # noqa: E402

from lmcompress import distillation, training  # noqa: E402


def kill_in_save(step):
    save_rng_state = Trainer._save_rng_state

    def save_then_die(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        save_rng_state(self, output_dir)

    Trainer._save_rng_state = save_then_die


def poison_loss(trainer, step, rank):
    compute_loss = trainer.compute_loss

    def compute_nan_loss(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        if trainer.state.global_step + 1 == step and trainer.args.process_index == rank:
            loss = loss * float("nan")
        return loss

    trainer.compute_loss = compute_nan_loss


class WritePid(TrainerCallback):
    def __init__(self, folder):
        self.folder = Path(folder)

    def on_train_begin(self, args, state, control, **kwargs):
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{args.process_index}.pid").write_text(str(os.getpid()))


def with_faults(build_trainer):
    def build_faulty_trainer(argv=None):
        trainer, resume = build_trainer(argv)
        if os.environ.get("FAULT_NAN_AT_STEP"):
            poison_loss(trainer, int(os.environ["FAULT_NAN_AT_STEP"]), int(os.environ.get("FAULT_NAN_RANK", "0")))
        if os.environ.get("FAULT_PID_DIR"):
            trainer.add_callback(WritePid(os.environ["FAULT_PID_DIR"]))
        return trainer, resume

    return build_faulty_trainer


if __name__ == "__main__":
    module = {"train": training, "distil": distillation}[sys.argv.pop(1)]
    if os.environ.get("FAULT_KILL_IN_SAVE"):
        kill_in_save(int(os.environ["FAULT_KILL_IN_SAVE"]))
    module.build_trainer = with_faults(module.build_trainer)
    module.main(sys.argv[1:])
