"""`python -m saisa.cli VERB ...` (as `accelerate launch` and `torchrun` need a module): the `saisa` command."""

import sys

from saisa_cli import VERBS, main

__all__ = ["VERBS", "main"]

if __name__ == "__main__":
    sys.exit(main())
