"""The training engine: transformers' Trainer (so `accelerate launch`/`torchrun`, DeepSpeed and FSDP work as they do
for any transformers model), plus what LLaVA-style training needs on top of it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"


class SaisaTrainer(Trainer):
    def __init__(self, *args, lengths: list[int] | None = None, **kwargs):
        self.lengths = lengths
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length" and self.lengths is not None:
            # Our dataset knows cheap length estimates; the default would read every image to measure them.
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=self.lengths)
        return super()._get_train_sampler(train_dataset)

    def _save_checkpoint(self, model, trial) -> None:
        """A checkpoint counts only once the marker is written last: a crash mid-save never becomes a resume point."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            marker = folder / COMPLETE_MARKER
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(str(self.state.global_step))
            os.replace(tmp, marker)


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    complete = [p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (p / COMPLETE_MARKER).exists()]
    if not complete:
        return None
    return str(max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1])))


class ThroughputCallback(TrainerCallback):
    """Adds samples/s since the previous log line to every log."""

    def __init__(self):
        self._last = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        now = time.perf_counter()
        if self._last is not None and logs is not None and "loss" in logs:
            steps = state.global_step - self._last[1]
            if steps > 0:
                samples = steps * args.train_batch_size * args.gradient_accumulation_steps * args.world_size
                logs["samples_per_s"] = round(samples / (now - self._last[0]), 3)
        self._last = (now, state.global_step)


class LossCurveCallback(TrainerCallback):
    """Writes `loss.png` (training loss against step) in the output folder at the end."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        points = [(entry["step"], entry["loss"]) for entry in state.log_history if "loss" in entry]
        if not points:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(Path(args.output_dir).name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(Path(args.output_dir) / "loss.png", dpi=110)
        plt.close(fig)
