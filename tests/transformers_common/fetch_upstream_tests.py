"""transformers' own common test files (tests/test_*_common.py) for the INSTALLED transformers version, from that
version's sdist on PyPI (fetched with pip, the only network this needs), cached outside the repository.

    python tests/transformers_common/fetch_upstream_tests.py      # prints the folder; fetches it once

The test modules here import `upstream_tests_dir()`, so the suite fetches on first use. The cache lives in
`$SAISA_UPSTREAM_TESTS` (default `~/.cache/saisa/upstream-tests/transformers-<version>/tests`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def _cache_root() -> Path:
    default = Path.home() / ".cache" / "saisa" / "upstream-tests"
    return Path(os.environ.get("SAISA_UPSTREAM_TESTS", default))


def upstream_tests_dir(version: str | None = None) -> Path:
    """The folder holding transformers-`version`'s tests/*.py (default: the installed version), fetched if absent."""
    if version is None:
        import transformers

        version = transformers.__version__
    folder = _cache_root() / f"transformers-{version}" / "tests"
    if (folder / "test_processing_common.py").exists():
        return folder
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        command += [f"transformers=={version}", "--dest", download]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        sdists = list(Path(download).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise RuntimeError(
                f"could not fetch transformers=={version}'s sdist from PyPI (for its common tests): "
                f"{done.stderr.strip()[-500:]}"
            )
        partial = folder.with_name("tests.partial")
        partial.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0]) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts  # transformers-X/tests/test_*.py only
                if member.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                    (partial / parts[2]).write_bytes(archive.extractfile(member).read())
        partial.rename(folder)  # atomic: a half-extracted folder is never used
    return folder


if __name__ == "__main__":
    print(upstream_tests_dir(sys.argv[1] if len(sys.argv) > 1 else None))
