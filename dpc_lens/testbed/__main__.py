"""``python -m dpc_lens.testbed``: rebuild the shipped test bed (see :mod:`dpc_lens.testbed.build`)."""

from .build import main

if __name__ == "__main__":
    raise SystemExit(main())
