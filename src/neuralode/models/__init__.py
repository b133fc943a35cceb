"""Models built on :func:`neuralode.solve`: neural ODE layers, ODE-Net, ODE-RNN, latent ODE.

- :class:`NeuralODE` -- a vector field network as a continuous-depth layer (optionally
  augmented), with the NFE of the last forward and backward pass.
- :class:`ODENetClassifier` -- downsampling, one ODE block, a classification head (ODE-Net).
- :class:`ODERNN` -- GRU updates at observations, ODE evolution in between, on per-sample
  irregular times with per-channel masks.
- :class:`LatentODE` -- VAE with an ODE-RNN encoder and latent ODE decoder; ELBO / IWAE,
  interpolation, extrapolation, optional classification from ``z0``.
- :class:`CNF` -- a continuous normalising flow (FFJORD): ``log_prob``, ``sample``, and a loss
  with the RNODE regularisers (kinetic energy, Jacobian Frobenius norm).
- Building blocks: :class:`MLPVectorField`, :class:`ConvVectorField`, :class:`ConcatConv2d`,
  :class:`SolverSettings`.

The models use the public API only; importing them does not import pandas or the data loaders.

References
----------
Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018.
Rubanova, Chen, Duvenaud, "Latent ODEs for Irregularly-Sampled Time Series", NeurIPS 2019.
Dupont, Doucet, Teh, "Augmented Neural ODEs", NeurIPS 2019.
Grathwohl et al., "FFJORD", ICLR 2019. Finlay et al., "How to train your neural ODE", ICML 2020.
"""

from .base import MLPVectorField, SolverSettings
from .cnf import CNF, CNFLoss
from .latent_ode import LatentODE
from .neural_ode import NeuralODE
from .ode_rnn import ODERNN
from .odenet import ConcatConv2d, ConvVectorField, ODENetClassifier

__all__ = [
    "NeuralODE",
    "ODENetClassifier",
    "ODERNN",
    "LatentODE",
    "CNF",
    "CNFLoss",
    "MLPVectorField",
    "ConvVectorField",
    "ConcatConv2d",
    "SolverSettings",
]
