"""Errors raised while loading models: one class, so CLIs can print the message and exit non-zero."""


class ModelLoadError(RuntimeError):
    """A model file is missing, corrupt or does not match what the model expects; the message says which."""


class TrainingDiverged(RuntimeError):
    """Training stopped because too many steps in a row had non-finite losses or gradients; the message names
    the steps and the last good checkpoint."""
