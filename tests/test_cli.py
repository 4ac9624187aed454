"""The command line: `saisa --help` answers without loading torch (it imports no verb's module); `saisa train` leaves no
process group behind."""

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


def test_train_verb_tears_down_its_process_group(tmp_path):
    """Under torchrun, `saisa train` destroys the process group before exiting (a rank exiting with gloo's threads
    live while its peer still saves can abort in C++ and fail a finished run)."""
    import torch.distributed as dist

    from saisa.commands.train import _close_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    _close_process_group()
    assert not dist.is_initialized()
    _close_process_group()  # and a no-op outside torchrun
