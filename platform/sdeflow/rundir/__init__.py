"""A run folder's files and rules: atomic writes and checkpoints, metrics.jsonl and TensorBoard, eval.json
and the per-example records, the folder's lock, resume rules and config.yaml."""
