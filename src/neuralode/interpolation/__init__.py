"""Per-step interpolants and the dense output over all accepted steps."""

from .dense import DenseOutput

__all__ = ["DenseOutput"]
