"""`python -m cdc_sink`: the command-line entry point."""

import sys

from cdc_sink.cli import main

sys.exit(main())
