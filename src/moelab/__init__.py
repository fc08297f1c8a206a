"""moelab: build, train, evaluate, analyse and scale sparse Mixture-of-Experts language models."""

__version__ = "0.1.0"
