"""The model's vocabulary, which every other layer uses: errors, hook specs and the component interfaces,
the composed model and its bounds, data transforms, seeding, error bars, time grids, batches, and the
distributed and compiled execution contexts. Imports nothing else of sdeflow."""
