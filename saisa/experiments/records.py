"""What an experiment records beside its figures (the command, its wall time, how busy the machine was: other work
slows every candidate alike but stretches wall times) and the files it writes from them."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path


def machine() -> dict:
    return {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()}


def run_line(result: dict) -> str:
    """The markdown sentence saying how `result` was made."""
    return (
        f"Command: `{result['command']}` ({result['machine']['cpus']} CPU cores, load average at the end "
        f"{result['machine']['load_average_at_end'][0]:.1f}; {result['wall_time_s'] / 60:.0f} min)."
    )


def publish(
    result: dict,
    out: Path,
    *,
    stem: str,
    plot_name: str,
    command: str,
    started: float,
    markdown: Callable[[dict], str],
    plot: Callable[[dict, Path], None],
) -> str:
    """Complete `result` (command, wall time since `started`, machine), write `stem`.json / .md and `plot_name` under
    `out`; returns the markdown."""
    result.update(command=command, wall_time_s=time.perf_counter() - started, machine=machine())
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / f"{stem}.md").write_text(text)
    plot(result, out / plot_name)
    return text
