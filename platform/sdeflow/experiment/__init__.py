"""The experiment as data: the checked ``Experiment`` from YAML and overrides, and reading YAML and JSON
files safely."""
