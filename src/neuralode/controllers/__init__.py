"""Step-size controllers: how the engine chooses steps.

- :class:`ConstantStep` -- fixed steps of size ``dt`` (the last one clipped to the end time).
- :class:`StepToGrid` -- fixed steps between the points of a user grid.
- :class:`PIController` -- adaptive steps from the embedded error estimate (PI control, with the
  I controller as the default special case) and Hairer's initial step selection.
- :class:`Controller` -- the protocol they implement: subclass it to write a new controller.

Controllers hold settings only; the per-solve state is threaded through the stepping loop.
"""

from .base import Controller
from .step_size import ConstantStep, PIController, StepToGrid

__all__ = ["Controller", "ConstantStep", "StepToGrid", "PIController"]
