"""``python -m sdeflow`` is the ``sdeflow`` command (torchrun uses this form)."""

from .cli.main import main

raise SystemExit(main())
