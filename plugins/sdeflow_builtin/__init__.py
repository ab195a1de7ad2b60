"""sdeflow's built-in components. Each module is a plugin of its own, declared in pyproject.toml
under the ``sdeflow`` entry-point group and found exactly as a third-party plugin is."""
