"""The training recipe: train and evaluate, the objects a run is built from, optimizers, the learning-rate schedule, accuracy counts and memory formats."""
