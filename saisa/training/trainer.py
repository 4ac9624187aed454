"""The training engine: transformers' Trainer (so `accelerate launch`/`torchrun`, DeepSpeed and FSDP work as they do
for any transformers model), plus what LLaVA-style training needs on top of it."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order drawn from (seed, epoch) alone: every rank draws the same permutation before
    accelerate shards it, and a run resumed in any epoch replays that epoch's order."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class SaisaTrainer(Trainer):
    def __init__(self, *args, lengths: list[int] | None = None, **kwargs):
        self.lengths = lengths
        self.length_sampler: EpochSeededLengthGroupedSampler | None = None
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length" and self.lengths is not None:
            # Our dataset knows cheap length estimates; the default would read every image to measure them.
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self.length_sampler = EpochSeededLengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, self.lengths, seed
            )
            return self.length_sampler
        return super()._get_train_sampler(train_dataset)

    def _run_epoch(self, *args, epoch: int, **kwargs):
        if self.state.global_step >= self.state.max_steps:
            # Resumed at max_steps mid-epoch: transformers would run that epoch's next step before checking the limit.
            self.control.should_training_stop = True
            return
        if self.length_sampler is not None:
            # Set here because on several ranks, once a resume skips batches, the sampler sits under accelerate's
            # SkipBatchSampler(BatchSamplerShard(...)) where neither accelerate's nor transformers' set_epoch reaches.
            self.length_sampler.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """A checkpoint counts only once its marker is written last, and older checkpoints are rotated only after
        that: a crash at any point of a save leaves the previous complete checkpoint to resume from."""
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            # A resume that fell back past a broken checkpoint saves into its folder again: unmark it first.
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None  # transformers' rotation off
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        self.accelerator.wait_for_everyone()  # every rank's files (its RNG state, its shards) are on disk
        if self.args.should_save:
            self._mark_complete(folder)
            self._rotate_complete_checkpoints(run_dir, newest=folder)

    def _mark_complete(self, folder: Path) -> None:
        marker = folder / COMPLETE_MARKER
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(str(self.state.global_step))
        os.replace(tmp, marker)

    def _rotate_complete_checkpoints(self, run_dir: Path, newest: Path) -> None:
        """transformers' rotation (keep `save_total_limit`, the newest and the best), counting complete checkpoints
        only; folders without a marker are what a crash mid-save left behind, and go."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        complete = []
        for checkpoint in checkpoint_folders(run_dir):
            if (checkpoint / COMPLETE_MARKER).exists():
                complete.append(checkpoint)
            else:
                shutil.rmtree(checkpoint, ignore_errors=True)
        protected = {newest.name}
        if self.state.best_model_checkpoint is not None:
            protected.add(Path(self.state.best_model_checkpoint).name)
        removable = [checkpoint for checkpoint in complete if checkpoint.name not in protected]  # oldest first
        for checkpoint in removable[: max(0, len(complete) - max(limit, len(protected)))]:
            (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)  # a deletion cut short must not look complete
            shutil.rmtree(checkpoint, ignore_errors=True)


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders, oldest step first."""
    steps = {}
    for folder in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and folder.is_dir():
            steps[int(step)] = folder
    return [steps[step] for step in sorted(steps)]


def unreadable_file(checkpoint: Path) -> str | None:
    """What resuming reads, opened cheaply but for real, in the checkpoint and its subfolders (DeepSpeed's
    global_stepN/): safetensors headers (which must cover the whole file, so truncation shows), every JSON file, and
    the optimizer/scheduler/scaler/RNG states memory-mapped as they are loaded. Returns "file: error" for the first
    that fails. (FSDP's distributed-checkpoint shards are not read here.)"""
    if not (checkpoint / "trainer_state.json").is_file():
        return f"{checkpoint / 'trainer_state.json'}: missing"
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            elif path.suffix == ".json":
                content = json.loads(path.read_text())
                if path.name.endswith(".index.json"):  # a sharded model: every shard it names is there
                    for shard in sorted(set(content.get("weight_map", {}).values())):
                        if not (checkpoint / shard).is_file():
                            return f"{checkpoint / shard}: missing"
            elif path.suffix in (".pt", ".pth") and path.parent == checkpoint:
                with safe_globals():
                    torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            elif path.suffix == ".pt":  # DeepSpeed's own states (global_stepN/), which it unpickles in full
                torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as error:  # whatever the reader raises, the file cannot be resumed from
            return f"{path}: {error}"
    return None


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint that is marked complete and readable; a broken one is named and the one before it tried."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    for checkpoint in reversed(checkpoint_folders(folder)):
        if not (checkpoint / COMPLETE_MARKER).exists():
            continue
        problem = unreadable_file(checkpoint)
        if problem is None:
            return str(checkpoint)
        print(f"cannot resume from {checkpoint.name}, {problem}; trying the previous complete checkpoint")
    return None


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
        ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(Path(args.output_dir).name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(Path(args.output_dir) / "loss.png", dpi=110)
        plt.close(fig)
