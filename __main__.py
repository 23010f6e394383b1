"""`python -m slimfx` is the `slimfx` command."""
import sys

from .cli import main

sys.exit(main())
