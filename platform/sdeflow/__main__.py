"""``python -m sdeflow`` is the ``sdeflow`` command (torchrun uses this form)."""

from .cli.commands import main

raise SystemExit(main())
