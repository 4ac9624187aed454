"""The training engine: transformers' Trainer (so `accelerate launch`/`torchrun`, DeepSpeed and FSDP work as they do
for any transformers model), plus what LLaVA-style training needs on top of it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
MANIFEST = "checkpoint_manifest.json"
RESUME_MODES = ("full", "weights-only")


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be resumed as asked."""


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
        self.fresh_training_state = False  # `--resume weights-only`: no optimizer/scheduler/RNG state is loaded
        self.step_loss_finite: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    # Private Trainer hook: the only place the Trainer lets a subclass choose the training sampler.
    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length" and self.lengths is not None:
            # Our dataset knows cheap length estimates; the default would read every image to measure them.
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self.length_sampler = EpochSeededLengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, self.lengths, seed
            )
            return self.length_sampler
        return super()._get_train_sampler(train_dataset)

    # Private Trainer hook: the one call per epoch, where the epoch number is known before any batch is drawn.
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

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        # Accumulated on device without a sync; read once per optimizer step by NonFiniteGuard.
        finite = torch.isfinite(loss.detach()).all()
        self.step_loss_finite = finite if self.step_loss_finite is None else self.step_loss_finite & finite
        return loss

    # Private Trainer hooks (this one and the two below): resuming loads each training state here, and a weights-only
    # resume must skip them while still loading the weights and the step.
    def _load_optimizer_and_scheduler(self, checkpoint):
        if not self.fresh_training_state or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        # `--resume weights-only`: a fresh optimizer, and the schedule moved on to the resumed step (not restarted).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(self.state.global_step):
                self.lr_scheduler.step()
        return None

    def _load_rng_state(self, checkpoint):
        if not self.fresh_training_state:
            super()._load_rng_state(checkpoint)

    def _load_scaler(self, checkpoint):
        if not self.fresh_training_state:
            super()._load_scaler(checkpoint)

    # Private Trainer hook: every periodic save goes through it, so the manifest and marker follow each one.
    def _save_checkpoint(self, model, trial) -> None:
        """A checkpoint counts only once its manifest (size and SHA-256 of every file) and then its marker are written,
        and older checkpoints are rotated only after that: a crash or a full disk at any point of a save leaves the
        previous complete checkpoint to resume from."""
        run_dir = Path(self._get_output_dir(trial=trial))  # private: where the Trainer itself puts checkpoint-N
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.exists():
            # A resume that fell back past a broken checkpoint saves into its folder again: start it empty, unmarked.
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None  # transformers' rotation off
        try:
            with disk_errors(folder, remove_on_failure=self.args.should_save):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        self.accelerator.wait_for_everyone()  # every rank's files (its RNG state, its shards) are on disk
        if self.args.should_save:
            with disk_errors(folder, remove_on_failure=True):
                self._mark_complete(folder)
            self._rotate_complete_checkpoints(run_dir, newest=folder)

    def _mark_complete(self, folder: Path) -> None:
        manifest_hash = write_manifest(folder)
        marker = {"step": self.state.global_step, "manifest_sha256": manifest_hash}
        write_atomically(folder / COMPLETE_MARKER, json.dumps(marker).encode())

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


class NonFiniteGuard(TrainerCallback):
    """Stops training with an error on a non-finite loss or gradient. Up to `patience` such optimizer steps in a row
    are skipped instead (their gradients dropped, so no NaN reaches the weights); a finite step resets the count.
    Under DeepSpeed the engine has stepped before this runs: there only the stop applies."""

    def __init__(self, trainer: SaisaTrainer, patience: int):
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise ValueError(f"training.nonfinite_patience must be an integer >= 0, got {patience!r}")
        self.trainer = trainer
        self.patience = patience
        self.in_a_row = 0
        self.skipped_steps: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        model = trainer.model_wrapped
        loss_finite = trainer.step_loss_finite
        trainer.step_loss_finite = None
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this rank's shard
        ok = torch.ones((), dtype=torch.bool, device=args.device)
        loss_ok = ok if loss_finite is None else loss_finite.to(args.device)
        grads_ok = torch.stack([torch.isfinite(g).all().to(args.device) for g in grads]).all() if grads else ok
        flags = torch.stack([loss_ok, grads_ok]).to(torch.int)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)  # one rank's NaN stops them all
        loss_ok, grads_ok = flags.tolist()
        if loss_ok and grads_ok:
            self.in_a_row = 0
            return
        step = state.global_step + 1
        what = "loss" if not loss_ok else "gradient norm"
        self.in_a_row += 1
        # DeepSpeed's engine applies the update inside backward, before this runs: a "skipped" step would already be
        # in the weights, so there every non-finite step stops training.
        applied = getattr(trainer, "is_deepspeed_enabled", False)
        if self.in_a_row > self.patience or applied:
            raise FloatingPointError(
                f"non-finite {what} at step {step} ({self.in_a_row} non-finite step(s) in a row, "
                f"training.nonfinite_patience={self.patience}"
                + (", which DeepSpeed cannot honour: its engine has applied the update already" if applied else "")
                + "): stopping; lower the learning rate, check the data, or resume from the last checkpoint"
            )
        for param in model.parameters():
            param.grad = None  # the optimizer skips parameters without a gradient: this step changes no weight
        self.skipped_steps.append(step)
        logger.warning("non-finite %s at step %d: skipping its update (%d in a row allowed)", what, step, self.patience)


@contextlib.contextmanager
def disk_errors(path: Path, *, remove_on_failure: bool):
    """A full disk named as such, whatever layer hit it (torch's zip writer reports only "enforce fail ... unexpected
    pos", safetensors an IoError); the half-written `path` goes with it, freeing space and leaving nothing to trust."""
    try:
        yield
    except Exception as error:
        message = str(error)
        full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or any(
            sign in message for sign in ("unexpected pos", "No space left on device", "StorageFull", "os error 28")
        )
        if not full:
            raise
        written = getattr(error, "filename", None) or path
        if remove_on_failure:
            if Path(path).is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                Path(path).unlink(missing_ok=True)
        free = shutil.disk_usage(Path(path).parent if Path(path).parent.exists() else ".").free
        kept = f"removed the partial save {path}" if remove_on_failure else f"{path} may hold a partial save"
        raise OSError(
            errno.ENOSPC,
            f"no space left on device while writing {written} ({free} bytes free now; {kept}; "
            f"the writer said: {message[:200]})",
        ) from error


def write_atomically(path: Path, content: bytes) -> None:
    """Written to a temporary name, flushed to disk, then renamed: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    """hashlib releases the GIL on large buffers: a few threads read and hash files side by side."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


def _checkpoint_files(folder: Path) -> list[Path]:
    """Every file of a checkpoint but its manifest and marker (and their temporary names)."""
    own = {MANIFEST, COMPLETE_MARKER, MANIFEST + ".tmp", COMPLETE_MARKER + ".tmp"}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in own)


def write_manifest(folder: Path) -> str:
    """`checkpoint_manifest.json`: size and SHA-256 of every file of the checkpoint (subfolders too: DeepSpeed's
    global_stepN/, FSDP's sharded states). Returns the manifest's own SHA-256, which the completion marker records."""
    paths = _checkpoint_files(folder)
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": digest}
        for p, digest in zip(paths, _hash_all(paths), strict=True)
    }
    content = json.dumps({"format": 1, "files": files}, indent=1).encode()
    write_atomically(folder / MANIFEST, content)
    return hashlib.sha256(content).hexdigest()


def _training_state_kind(name: str) -> str | None:
    """Which part of the training state a checkpoint file holds, by transformers', accelerate's and DeepSpeed's
    names; None for the model, the trainer state and the rest."""
    top = name.split("/", 1)[0]
    if top.startswith("optimizer") or (top.startswith("global_step") and "optim_states" in name):
        return "optimizer"
    if top.startswith("scheduler"):
        return "scheduler"
    if top.startswith("rng_state"):
        return "rng"
    if top.startswith("scaler"):
        return "scaler"
    return None


def checkpoint_problem(checkpoint: Path, *, full: bool = True, weights_only: bool = False) -> str | None:
    """Why `checkpoint` cannot be resumed, naming the file, or None. Cheap (`full=False`): marker, manifest, every
    listed file present with its size. Full: every file's SHA-256 too. Unless `weights_only`, the optimizer,
    scheduler and RNG states must be there (a resume without them continues on a different path)."""
    try:
        return _checkpoint_problem(checkpoint, full=full, weights_only=weights_only)
    except OSError as error:  # a file that cannot be read (permissions, I/O error) is a reason too, not a crash
        return f"{error.filename or checkpoint}: unreadable ({error.strerror or error})"


def _checkpoint_problem(checkpoint: Path, *, full: bool, weights_only: bool) -> str | None:
    marker = checkpoint / COMPLETE_MARKER
    manifest_path = checkpoint / MANIFEST
    if not marker.is_file():
        return f"{marker}: missing (the save did not finish)"
    try:
        recorded = json.loads(marker.read_bytes())["manifest_sha256"]
    except (ValueError, KeyError, TypeError) as error:
        return f"{marker}: unreadable ({type(error).__name__}: {error}); not written by this saisa, or damaged"
    if not manifest_path.is_file():
        return f"{manifest_path}: missing"
    raw = manifest_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != recorded:
        return f"{manifest_path}: its SHA-256 differs from the one the completion marker records (damaged)"
    files = json.loads(raw)["files"]
    if "trainer_state.json" not in files:
        return f"{checkpoint / 'trainer_state.json'}: not in the checkpoint"
    kinds = {_training_state_kind(name) for name in files}
    if not weights_only:
        deepspeed = any(name.startswith("global_step") for name in files)  # its scheduler may live in its states
        for kind, names in (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"), ("rng", "rng_state*.pth")):
            if kind not in kinds and not (kind == "scheduler" and deepspeed):
                return (
                    f"{checkpoint / names}: not in the checkpoint (saved without its {kind} state): resuming would "
                    "not continue the same run; `--resume weights-only` continues from its weights alone"
                )
    checked = [
        (checkpoint / name, entry)
        for name, entry in files.items()
        if not (weights_only and _training_state_kind(name) is not None)
    ]
    for path, entry in checked:
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path}: {size} bytes where the manifest says {entry['size']} (truncated or overwritten)"
    # transformers loads a consolidated model.safetensors or pytorch_model.bin in preference to a sharded index, and
    # any adapter subfolder: a file added after the save can replace the weights as surely as a damaged one.
    added = [p for p in _checkpoint_files(checkpoint) if p.relative_to(checkpoint).as_posix() not in files]
    if added:
        return f"{added[0]}: not in the manifest (added after the save)"
    if full:
        for (path, entry), digest in zip(checked, _hash_all([path for path, _ in checked]), strict=True):
            if digest != entry["sha256"]:
                return f"{path}: its SHA-256 differs from the manifest's (the file changed after the save)"
    return None


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders, oldest step first."""
    steps = {}
    for folder in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and folder.is_dir():
            steps[int(step)] = folder
    return [steps[step] for step in sorted(steps)]


def last_good_checkpoint(output_dir: str | Path, mode: str = "full") -> Path | None:
    """The newest checkpoint that proves itself (full hash check); each one that fails is named in a warning and the
    one before it tried. None when `output_dir` holds no completed checkpoint at all; CheckpointError when it holds
    some but none can be resumed (`mode` "full": with optimizer, scheduler and RNG states; "weights-only": weights)."""
    if mode not in RESUME_MODES:
        raise ValueError(f"resume mode must be one of {RESUME_MODES}, got {mode!r}")
    folders = checkpoint_folders(Path(output_dir)) if Path(output_dir).is_dir() else []
    problems = []
    for checkpoint in reversed(folders):
        if not (checkpoint / COMPLETE_MARKER).exists() and not (checkpoint / MANIFEST).exists():
            continue  # a save cut short before its manifest: never complete, nothing to report
        problem = checkpoint_problem(checkpoint, full=True, weights_only=mode == "weights-only")
        if problem is None:
            return checkpoint
        problems.append(problem)
        logger.warning("cannot resume from %s: %s; trying the previous checkpoint", checkpoint.name, problem)
    if not problems:  # nothing was ever completed (at most a first save cut short): nothing to lose
        return None
    raise CheckpointError(
        f"no checkpoint in {output_dir} can be resumed:\n  " + "\n  ".join(problems) + "\n"
        "Run without --resume to start afresh (its checkpoints will be overwritten)"
        + ("" if mode == "weights-only" else ", or with --resume weights-only to continue from weights alone")
    )


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
