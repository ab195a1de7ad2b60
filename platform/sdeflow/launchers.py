"""The old path of :mod:`sdeflow.sweeps.launchers`, kept for one release: submitit jobs queued by sdeflow
0.1 pickled ``sdeflow.launchers.VariantJob`` by this path, and a requeued job must still unpickle. New code
imports ``sdeflow.sweeps.launchers``."""

from .sweeps.launchers import VariantJob

__all__ = ["VariantJob"]
