"""Training, evaluation and prediction on top of the networks, maps and data modules."""
