"""Training: chat data, the training loop, run state and resume, the library entry points."""

from xlora.train.api import LoraOptions, check_outputs, routing_prior, train_expert, train_gate

__all__ = ["LoraOptions", "check_outputs", "routing_prior", "train_expert", "train_gate"]
