import sys

from saisa_cli import main

sys.exit(main())
