"""The package's layering (scripts/check_imports.py): the real tree is clean, and the checker finds each kind of
violation in a made-up tree (so a clean result means something)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", REPO / "scripts" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = module  # dataclasses and friends look their module up by name
    spec.loader.exec_module(module)
    return module


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "saisa" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "saisa"


def test_the_package_follows_its_layers():
    assert _checker().check(REPO / "saisa") == []


def test_every_kind_of_violation_is_found(tmp_path):
    checker = _checker()
    package = _tree(
        tmp_path,
        {
            "__init__.py": "from saisa.model import Model\n",
            "compat.py": "",
            "model/__init__.py": "from saisa.model.core import Model\n",
            "model/core.py": "def load():\n    from saisa.checkpoints.loading import load  # a lazy upward import\n",
            "model/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from saisa.cli import main\n",
            "checkpoints/__init__.py": "",
            "checkpoints/loading.py": "from ..model import core\n\ndef load(): ...\n",  # relative, downward: fine
            "serving/__init__.py": "from saisa.training import run\n",  # a sibling on the same layer
            "training/__init__.py": "from saisa import compat\nrun = None\n",
            "inference/a.py": "from saisa.inference import b\n",
            "inference/b.py": "import saisa.inference.a\n",
            "gadgets/x.py": "",
        },
    )
    problems = "\n".join(checker.check(package))
    assert "`model` imports saisa.checkpoints.loading from a higher layer" in problems
    assert "`serving` imports saisa.training from a sibling part" in problems
    assert "part `gadgets` is in no layer" in problems
    assert "import cycle among: saisa.inference.a, saisa.inference.b" in problems
    assert "import cycle among: saisa.checkpoints.loading, saisa.model.core" in problems  # the lazy import counts
    assert "saisa.cli" not in problems  # TYPE_CHECKING imports never run
    assert "checkpoints/loading.py" not in problems  # `from ..model import core` resolves downward
    assert "training/__init__.py" not in problems  # `from saisa import compat` names the lowest layer
    assert len(problems.splitlines()) == 5, problems
