"""From ``solve``'s step-control arguments to a controller object (shared by every driver)."""

from __future__ import annotations

import torch

from .step_size import ConstantStep, Controller, PIController

__all__ = ["resolve_controller"]


def resolve_controller(tab, controller, rtol, atol, dt):
    """The controller of a solve from ``solve``'s ``controller``/``rtol``/``atol``/``dt``
    arguments and the method's tableau ``tab``: the one given (checked against the method), a
    :class:`ConstantStep` for ``dt``, else a :class:`PIController` (defaults rtol 1e-6, atol
    1e-8; one cached instance per float tolerance pair, since controllers are immutable).
    Raises ValueError/TypeError naming the conflicting or wrong argument."""
    if controller is not None:
        given = [n for n, v in (("rtol", rtol), ("atol", atol), ("dt", dt)) if v is not None]
        if given:
            raise ValueError(
                f"pass {', '.join(given)} inside the controller, not next to controller=... "
                "(e.g. PIController(rtol=..., atol=...) or ConstantStep(dt))"
            )
        if not isinstance(controller, Controller):
            raise TypeError(
                "controller must be a Controller (PIController, ConstantStep, StepToGrid or a "
                f"subclass of neuralode.controllers.Controller), got {type(controller).__name__}"
            )
        if controller.adaptive and not tab.adaptive:
            raise ValueError(
                f"solver {tab.name!r} has no embedded error estimate, so it cannot be used with "
                "an adaptive controller; use ConstantStep(dt) or StepToGrid(grid), or an adaptive "
                "method such as 'dopri5'"
            )
        _check_fields(controller)
        return controller
    if dt is not None:
        if rtol is not None or atol is not None:
            raise ValueError(
                "rtol/atol have no effect with a fixed step dt; pass either dt or rtol/atol"
            )
        return ConstantStep(dt)
    if not tab.adaptive:
        raise ValueError(
            f"solver {tab.name!r} is a fixed-step method (no error estimate): pass dt=... or "
            "controller=ConstantStep(dt) / StepToGrid(grid)"
        )
    rtol = 1e-6 if rtol is None else rtol
    atol = 1e-8 if atol is None else atol
    if type(rtol) is float and type(atol) is float:  # immutable: one per tolerance pair
        key = (rtol, atol)
        ctrl = _DEFAULT_CONTROLLERS.get(key)
        if ctrl is None:
            if len(_DEFAULT_CONTROLLERS) > 64:
                _DEFAULT_CONTROLLERS.clear()
            ctrl = _DEFAULT_CONTROLLERS[key] = PIController(rtol=rtol, atol=atol)
        return ctrl
    return PIController(rtol=rtol, atol=atol)


_DEFAULT_CONTROLLERS: dict = {}


def _check_fields(ctrl) -> None:
    """The fields the engine reads from a controller, checked once per solve (a subclass's
    mistakes then name the field instead of failing deep inside a step)."""
    name = type(ctrl).__name__
    if ctrl.adaptive:
        missing = [a for a in ("rtol", "atol") if not hasattr(ctrl, a)]
        if missing:
            raise TypeError(
                f"{name} is adaptive but has no {' or '.join(missing)}: an adaptive controller "
                "declares rtol and atol fields (floats or tensors broadcastable to the state), "
                "e.g. `rtol: float = 1e-6` and `atol: float = 1e-8` in the dataclass"
            )
    for a in ("step_t", "jump_t"):
        v = getattr(ctrl, a)
        if isinstance(v, torch.Tensor) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
        ):
            raise TypeError(
                f"{name}.{a} must be a tuple of Python floats, got {type(v).__name__} {v!r}; "
                f"convert it, e.g. {a}=tuple(float(x) for x in times)"
            )
