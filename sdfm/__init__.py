"""sdfm: flow matching with optimal-transport couplings, from one CPU process to GPU clusters."""

__version__ = "0.1.0"
