"""The one place that flattens and unflattens states.

A state is a tensor of any shape, or a tuple or dict of tensors. The engine works on one flat
tensor of shape ``(B, M)``: ``B`` is the batch size when every sample has its own output grid
(2-D ``t``) and 1 otherwise, ``M`` the number of scalars per batch row. Tuple and dict states
are concatenated along the second dimension; :class:`TreeSpec` remembers where each component
lives, so that the error norm can treat components separately (the maximum over components of
each component's RMS norm).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["TreeSpec", "flatten_state", "flat_tolerance", "real_dtype", "StateDtypeError"]


class StateDtypeError(TypeError):
    """A tensor given for the state (a derivative returned by func) has another dtype than the
    state's: a ``TypeError`` that also carries ``what`` was checked and the two dtypes (the
    torchdiffeq face retries its solve with a cast when ``what`` is func's derivative)."""

    def __init__(self, message: str, what: str, got: torch.dtype, want: torch.dtype):
        super().__init__(message)
        self.what, self.got, self.want = what, got, want


@dataclass(frozen=True)
class TreeSpec:
    """How a state structure maps onto the flat ``(B, M)`` tensor the engine integrates."""

    kind: str  # "tensor", "tuple" or "dict"
    keys: tuple  # dict keys (kind "dict"), else positions
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]  # scalars per batch row of each component
    batch: int
    dtype: torch.dtype
    device: torch.device

    @property
    def width(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    def components(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` (..., B, M) per component, each (..., B, size_i)."""
        if self.kind == "tensor":
            return [flat]
        return [flat[..., o : o + s] for o, s in zip(self.offsets, self.sizes)]

    def unflatten(self, flat: torch.Tensor, lead: tuple[int, ...] = ()):
        """Rebuild the state from ``flat`` of shape ``(*lead, B, M)``."""
        if self.kind == "tensor":
            shape = tuple(lead) + tuple(self.shapes[0])
            return flat if flat.shape == shape else flat.reshape(shape)
        parts = [
            c.reshape(tuple(lead) + tuple(shape))
            for c, shape in zip(self.components(flat), self.shapes)
        ]
        return self.rebuild(parts)

    def rebuild(self, parts: list):
        """The state structure (tensor, tuple or dict) holding ``parts``, one per component."""
        if self.kind == "tensor":
            return parts[0]
        if self.kind == "tuple":
            return tuple(parts)
        return dict(zip(self.keys, parts))

    def _describe(self) -> str:
        if self.kind == "tensor":
            return f"a tensor of shape {tuple(self.shapes[0])}"
        return f"a {self.kind} of shapes {[tuple(s) for s in self.shapes]}"

    def flatten(self, state, *, what: str = "state", t: float | None = None) -> torch.Tensor:
        """Flatten ``state`` (same structure, shapes and dtype as y0) to ``(B, M)``.

        Raises TypeError/ValueError naming ``what`` (e.g. "the derivative returned by func")
        when the structure, a shape or the dtype differs from y0's.
        """
        where = "" if t is None else f" at t={t:.17g}"
        if self.kind == "tensor":
            if not isinstance(state, torch.Tensor):
                raise TypeError(
                    f"{what}{where} is {type(state).__name__}, expected {self._describe()} like y0"
                )
            tensors = [state]
        elif self.kind == "tuple":
            if not isinstance(state, (tuple, list)) or len(state) != len(self.shapes):
                raise TypeError(
                    f"{what}{where} must be a tuple of {len(self.shapes)} tensors like y0, got "
                    f"{type(state).__name__}"
                    + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else "")
                )
            tensors = list(state)
        else:
            if not isinstance(state, Mapping) or set(state.keys()) != set(self.keys):
                got = list(state.keys()) if isinstance(state, Mapping) else type(state).__name__
                raise TypeError(
                    f"{what}{where} must be a dict with keys {list(self.keys)}, got {got}"
                )
            tensors = [state[k] for k in self.keys]
        for i, (x, shape) in enumerate(zip(tensors, self.shapes)):
            label = what if self.kind == "tensor" else f"component {self.keys[i]!r} of {what}"
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{label}{where} is {type(x).__name__}, expected a tensor")
            if x.shape != shape:
                fix = (
                    "func must return dy/dt with exactly the state's shape"
                    if "func" in what
                    else "it must have exactly the state's shape"
                )
                raise ValueError(
                    f"{label}{where} has shape {tuple(x.shape)} but the state has shape "
                    f"{tuple(shape)}; {fix} (no broadcasting)"
                )
            if x.dtype != self.dtype:
                raise StateDtypeError(
                    f"{label}{where} has dtype {x.dtype} but the state has dtype {self.dtype}; "
                    "make func return the state's dtype (cast parameters with module.to(dtype))",
                    what,
                    x.dtype,
                    self.dtype,
                )
        if self.kind == "tensor":
            return tensors[0].reshape(self.batch, -1)
        return torch.cat([x.reshape(self.batch, -1) for x in tensors], dim=1)


def flatten_state(y0, *, batched: bool, name: str = "y0") -> tuple[TreeSpec, torch.Tensor]:
    """Describe and flatten an initial state.

    Parameters
    ----------
    y0 : Tensor or tuple/dict of Tensors
        The initial state. With ``batched=True`` every component's first dimension is the batch.
    batched : bool
        Whether the batch dimension is kept separate (per-sample output grids).

    Raises
    ------
    TypeError
        If ``y0`` is not a tensor or tuple/dict of tensors, mixes dtypes or devices, or has a
        non-floating dtype.
    ValueError
        If ``batched`` and the components disagree on the batch size.
    """
    if isinstance(y0, torch.Tensor):
        kind, keys, tensors = "tensor", (0,), [y0]
    elif isinstance(y0, (tuple, list)):
        if len(y0) == 0:
            raise ValueError(f"{name} is an empty tuple; pass at least one tensor")
        kind, keys, tensors = "tuple", tuple(range(len(y0))), list(y0)
    elif isinstance(y0, Mapping):
        if len(y0) == 0:
            raise ValueError(f"{name} is an empty dict; pass at least one tensor")
        kind, keys = "dict", tuple(y0.keys())
        tensors = [y0[k] for k in keys]
    else:
        raise TypeError(
            f"{name} must be a tensor or a tuple/dict of tensors, got {type(y0).__name__}; "
            "wrap numbers with torch.tensor(...)"
        )
    for k, x in zip(keys, tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}[{k!r}] is {type(x).__name__}, expected a tensor")
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(
                f"{name}{'' if kind == 'tensor' else f'[{k!r}]'} has dtype {x.dtype}; the state "
                "must be floating point or complex (use y0.to(torch.float32) or float64)"
            )
    for x in tensors:
        if x.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"{name} has dtype {x.dtype}: half precision cannot hold the error estimates of "
                "step-size control; solve in float32 (y0.float()) and cast the result"
            )
    if sum(x.numel() for x in tensors) == 0:
        raise ValueError(f"{name} has no elements (shapes {[tuple(x.shape) for x in tensors]})")
    dtypes = {x.dtype for x in tensors}
    if len(dtypes) > 1:
        raise TypeError(
            f"the components of {name} have different dtypes {sorted(map(str, dtypes))}; "
            "cast them to one dtype"
        )
    devices = {x.device for x in tensors}
    if len(devices) > 1:
        raise TypeError(
            f"the components of {name} lie on different devices {sorted(map(str, devices))}"
        )
    if batched:
        sizes_b = {x.shape[0] if x.dim() > 0 else None for x in tensors}
        if None in sizes_b or len(sizes_b) > 1:
            raise ValueError(
                f"with a 2-D t (one output grid per sample) every component of {name} needs the "
                f"same leading batch dimension; got shapes {[tuple(x.shape) for x in tensors]}"
            )
        batch = tensors[0].shape[0]
    else:
        batch = 1
    shapes = tuple(x.shape for x in tensors)
    sizes = tuple(x.numel() // batch if batch else 0 for x in tensors)
    spec = TreeSpec(kind, keys, shapes, sizes, batch, tensors[0].dtype, tensors[0].device)
    if kind == "tensor":
        flat = tensors[0].reshape(batch, -1)
    else:
        flat = torch.cat([x.reshape(batch, -1) for x in tensors], dim=1)
    return spec, flat


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of a (possibly complex) state dtype."""
    return dtype.to_real() if dtype.is_complex else dtype


def flat_tolerance(spec: TreeSpec, tol, name: str):
    """A float, or a tolerance tensor laid out like the flat state ``(B, M)``."""
    real = real_dtype(spec.dtype)
    if isinstance(tol, (int, float)):
        return float(tol)
    if isinstance(tol, torch.Tensor) and tol.numel() == 1:
        return float(tol)
    if spec.kind == "tensor":
        parts = [tol]
    elif spec.kind == "tuple":
        if not isinstance(tol, (tuple, list)) or len(tol) != len(spec.shapes):
            raise ValueError(
                f"{name} for a tuple state must be a number or a tuple of {len(spec.shapes)} "
                f"numbers/tensors (one per component), got {tol!r}"
            )
        parts = list(tol)
    else:
        if not isinstance(tol, Mapping) or set(tol) != set(spec.keys):
            raise ValueError(
                f"{name} for a dict state must be a number or a dict with keys {list(spec.keys)}"
            )
        parts = [tol[k] for k in spec.keys]
    flat = []
    for v, shape in zip(parts, spec.shapes):
        v = torch.as_tensor(v, dtype=real, device=spec.device)
        if bool((v < 0).any()) or not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite and non-negative, got {v.tolist()}")
        try:
            v = v.expand(shape)
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(v.shape)} does not broadcast to the state shape {tuple(shape)}"
            ) from None
        flat.append(v.reshape(spec.batch, -1))
    return torch.cat(flat, dim=1)
