"""neuralode: neural ordinary differential equations in PyTorch.

The native face is :func:`solve`, which takes a vector field, an initial state, output times and
small immutable objects for *how to step* (a solver), *how to choose steps* (a controller) and
*how to differentiate* (a gradient method), and returns a :class:`Solution`. The
torchdiffeq-compatible face is :func:`odeint` / :func:`odeint_adjoint`.
"""

from ._compat import odeint, odeint_adjoint, odeint_dense, odeint_event
from ._solve import solve
from .cli.runs import TrainedRun, load_run
from .controllers import ConstantStep, PIController, StepToGrid
from .errors import MaxStepsError, NonFiniteError, SolveError, StepSizeUnderflowError
from .events import Event
from .gradients import Backsolve, Checkpointed, Direct, Reversible
from .solution import Solution
from .solvers import ButcherTableau

__version__ = "0.1.0"

__all__ = [
    "solve",
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "odeint_dense",
    "Solution",
    "PIController",
    "ConstantStep",
    "StepToGrid",
    "Direct",
    "Backsolve",
    "Checkpointed",
    "Reversible",
    "ButcherTableau",
    "Event",
    "load_run",
    "TrainedRun",
    "SolveError",
    "StepSizeUnderflowError",
    "MaxStepsError",
    "NonFiniteError",
    "__version__",
]
