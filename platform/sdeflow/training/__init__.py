"""Training: the loop and its optimisation state, periodic milestones, stop signals, memory estimates."""
