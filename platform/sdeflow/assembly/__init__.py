"""An experiment composed from the registry: its parts and model (every ``sdeflow check`` rule), the
objective training minimises, and a run rebuilt in memory (fresh or from a folder)."""
