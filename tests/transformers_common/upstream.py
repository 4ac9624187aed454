"""transformers' own common test mixins, from the sdist on PyPI of the installed transformers version.

PyPI's transformers sdist ships `tests/test_modeling_common.py` (ModelTesterMixin) and `tests/test_processing_common.py`
(ProcessorTesterMixin), but not the modules the first imports relatively:
`tests/generation/test_utils.py` (GenerationTesterMixin) and `tests/exporters/test_export.py` (ExportTesterMixin). The
generation mixin is ported here (`generation_common.py`); torch.export is not, so ExportTesterMixin is an empty
stand-in and its tests do not exist in the ported suite. (`tests/test_configuration_common.py` is shipped but imports
`tests/utils/`, which is not: ConfigTester is not used.)

`import_upstream()` fetches the sdist once (PyPI, by pip, the only network it uses) into the git-ignored
`.upstream/<version>/`, extracts those files into a package `hf_tests`, and returns it. `scripts/setup.sh` calls it, so
test runs need no network.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
SHIPPED = ("test_modeling_common.py", "test_processing_common.py")
SHIMS = {
    "generation/test_utils.py": (
        "from transformers_common.generation_common import GenerationTesterMixin  # noqa: F401\n"
    ),
    "exporters/test_export.py": (
        "class ExportTesterMixin:\n"
        '    """Stand-in: tests/exporters is not in transformers\' sdist (no export tests here)."""\n'
    ),
}


def upstream_root(version: str = transformers.__version__) -> Path:
    return HERE / ".upstream" / version


def fetch(version: str = transformers.__version__) -> Path:
    """The `hf_tests` package for `version`, fetched and extracted if it is not there yet."""
    package = upstream_root(version) / "hf_tests"
    if all((package / name).exists() for name in SHIPPED):
        return package
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
            + [f"transformers=={version}", "--dest", tmp],
            check=True,
        )
        (sdist,) = Path(tmp).glob("transformers-*.tar.gz")
        staging = Path(tmp) / "hf_tests"
        staging.mkdir()
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2] in SHIPPED:
                    (staging / parts[2]).write_bytes(archive.extractfile(member).read())
        missing = [name for name in SHIPPED if not (staging / name).exists()]
        if missing:
            raise FileNotFoundError(f"transformers {version} sdist lacks tests/{missing}")
        (staging / "__init__.py").write_text("")
        for name, text in SHIMS.items():
            path = staging / name
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").write_text("")
            path.write_text(text)
        package.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(package) if not package.exists() else None
    return package


def import_upstream(module: str):
    """`hf_tests.<module>` (e.g. "test_modeling_common") of the installed transformers version."""
    package = fetch()
    root = str(package.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"hf_tests.{module}")


if __name__ == "__main__":
    print(fetch())
