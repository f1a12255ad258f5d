"""softmoe: Mixture-of-Experts with a differentiable truncated LapSum soft top-k router."""

__version__ = "0.1.0"
