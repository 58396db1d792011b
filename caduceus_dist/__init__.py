"""caduceus-dist: distributed, fault-tolerant pretraining of Caduceus DNA language models."""

__version__ = "0.1.0"
