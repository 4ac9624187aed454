"""The command line: `saisa --help` answers without loading torch (it imports no verb's module); `saisa train` leaves no
process group behind; every verb module only parses its flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import saisa_cli
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


def test_train_verb_tears_down_its_process_group(tmp_path):
    """Under torchrun, `saisa train` destroys the process group before exiting (a rank exiting with gloo's threads
    live while its peer still saves can abort in C++ and fail a finished run)."""
    import torch.distributed as dist

    from saisa.cli.train import _close_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    _close_process_group()
    assert not dist.is_initialized()
    _close_process_group()  # and a no-op outside torchrun


def test_every_verb_module_only_parses_and_calls():
    """A verb module parses its flags and calls one library function: each fits in 80 lines."""
    folder = Path(saisa_cli.__file__).parent / "saisa" / "cli"
    lengths = {path.name: len(path.read_text().splitlines()) for path in sorted(folder.glob("*.py"))}
    assert {"ask.py", "bench.py", "demo.py", "reproduce.py", "serve.py", "train.py"} <= set(lengths)
    assert {name: n for name, n in lengths.items() if n > 80} == {}
