"""The command line: `saisa --help` answers without loading torch (it imports no verb's module)."""

from __future__ import annotations

import subprocess
import sys

from saisa_cli import VERBS


def test_help_lists_every_verb_without_importing_torch():
    code = (
        "import sys, contextlib, io, saisa_cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    saisa_cli.main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules), out.getvalue())"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.startswith("[]"), run.stdout
    assert all(verb in run.stdout for verb in VERBS)
