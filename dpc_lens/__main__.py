"""Run the command-line interface: ``python -m dpc_lens ...``."""

from .cli import main

raise SystemExit(main())
