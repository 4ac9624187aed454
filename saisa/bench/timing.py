"""The one way this project times code: the device synchronised around each call, repeats interleaved across the
things compared, medians reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch
from tqdm import tqdm

# A job is an untimed set-up that returns the call to time (a decode needs a fresh prefill's cache every repeat).
Job = Callable[[], Callable[[], object]]


def synchronize(device: str | torch.device | None) -> None:
    """Wait for the device's queued work: CUDA runs kernels asynchronously, so without this the clock would stop
    when the work is queued, not when it is done."""
    if torch.device(device or "cpu").type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str | torch.device | None) -> float:
    """Seconds one call of `fn` takes on `device`, its queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(
    jobs: Mapping[str, Mapping[str, Job]],
    repeats: int,
    *,
    device: str | torch.device | None,
    after: Callable[[str], None] | None = None,
    description: str = "interleaved repeats",
) -> dict[str, dict[str, list[float]]]:
    """Every (candidate, metric) job timed `repeats` times: each repeat runs every candidate's jobs in turn, every
    other repeat in reverse order of candidates, so drift on the machine hits all alike and no candidate always runs
    right after the same other one. `after(candidate)` runs untimed after a candidate's turn (e.g. to free its
    gradients). Returns candidate -> metric -> seconds of every repeat, in order."""
    seconds = {name: {metric: [] for metric in metrics} for name, metrics in jobs.items()}
    names = list(jobs)
    # tqdm redraws only when told (here: after each candidate's turn), never from a thread that would take CPU from
    # the candidate being timed
    with tqdm(total=repeats * len(names), desc=description, miniters=1, mininterval=0) as progress:
        for repeat in range(repeats):
            for name in names if repeat % 2 == 0 else names[::-1]:
                for metric, job in jobs[name].items():
                    seconds[name][metric].append(timed(job(), device))
                if after is not None:
                    after(name)
                progress.update()
    return seconds


def medians(seconds: Mapping[str, list[float]]) -> dict[str, float]:
    """metric -> median of its repeats."""
    return {metric: statistics.median(values) for metric, values in seconds.items()}
