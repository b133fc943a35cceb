"""ODE-Net: an image classifier whose residual blocks are replaced by one ODE block."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import MLPVectorField, check_positive_int
from .neural_ode import NeuralODE, _check_dtype

__all__ = ["ConcatConv2d", "ConvVectorField", "ODENetClassifier"]


def _norm(channels: int) -> nn.GroupNorm:
    # Group normalisation as in Chen et al.'s ODE-Net (32 groups at their width 64), with at
    # least 2 channels per group: one channel per group normalises each channel of a small
    # feature map on its own, which on 8x8 digits cost ~2 points of accuracy and twice the NFE.
    # Falls back to a divisor of C so that any width (e.g. with augmented channels) works.
    groups = max(1, min(32, channels // 2))
    if channels % groups:
        groups = math.gcd(channels, groups)
    return nn.GroupNorm(groups, channels)


class ConcatConv2d(nn.Module):
    """2-D convolution of ``[t, x]``: the time enters as one extra constant input channel.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of ``x`` and of the output.
    kernel_size, stride, padding : int
        As for :class:`torch.nn.Conv2d` (defaults 3, 1, 1: shape preserving).

    References
    ----------
    Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018 (``ConcatConv2d`` of the
    reference implementation).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 1, out_channels, kernel_size, stride, padding)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, in_channels, H, W)`` -> ``(B, out_channels, H', W')``."""
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([tt, x], dim=1))


class ConvVectorField(nn.Module):
    """Convolutional vector field ``f(t, x)`` on feature maps ``(B, channels, H, W)``.

    ``norm -> ReLU -> ConcatConv2d -> norm -> ReLU -> ConcatConv2d -> norm`` (the ODE-Net
    block of Chen et al. 2018), with group normalisation and 3x3 shape-preserving convolutions.

    Parameters
    ----------
    channels : int
        Feature channels (input = output).

    References
    ----------
    Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018, section 3.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        self.norm1 = _norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = _norm(channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = _norm(channels)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(t, torch.relu(self.norm1(x)))
        h = self.conv2(t, torch.relu(self.norm2(h)))
        return self.norm3(h)


class ODENetClassifier(nn.Module):
    """ODE-Net classifier: downsampling -> ODE block on ``[0, 1]`` -> norm / pool / linear head.

    Parameters
    ----------
    in_shape : tuple of int, default ``(1, 8, 8)``
        Shape of one input ``(C, H, W)`` (e.g. scikit-learn digits: ``(1, 8, 8)``, MNIST:
        ``(1, 28, 28)``).
    n_classes : int, default 10
        Number of classes (output logits).
    width : int, default 64
        Channels of the ODE block (``field="conv"``) or width of its state (``"mlp"``).
    field : {"conv", "mlp"}, default "conv"
        ``"conv"``: convolutional downsampling (a 3x3 convolution, then ``downsample``
        stride-2 4x4 convolutions) and a :class:`ConvVectorField`. ``"mlp"``: the flattened
        input is mapped by a linear layer to ``width`` features and the ODE block uses a
        time-dependent :class:`MLPVectorField` with hidden width ``2 * width``.
    downsample : int, default 1
        Stride-2 convolutions before the ODE block (``"conv"`` only): 8x8 -> 4x4 with 1,
        28x28 -> 7x7 with 2 as in Chen et al.
    solver, rtol, atol, dt, controller, gradient, augment_dim, max_steps
        Passed to the :class:`NeuralODE` of the ODE block (defaults ``"dopri5"``, 1e-3, 1e-4,
        direct gradients, no augmentation).

    Raises
    ------
    ValueError
        For a malformed ``in_shape``, an unknown ``field``, non-positive sizes, too much
        downsampling for the image, or invalid solver settings.

    Examples
    --------
    >>> import torch
    >>> from neuralode.models import ODENetClassifier
    >>> ODENetClassifier((1, 8, 8), 10, width=16)(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4, 10])

    References
    ----------
    Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS
    2018, section 3 (ODE-Net: downsampling, one ODE block with time concatenation, norm /
    pool / fully connected head; trained at tolerance 1e-3). Dupont, Doucet, Teh, "Augmented
    Neural ODEs", NeurIPS 2019 (``augment_dim``).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...] = (1, 8, 8),
        n_classes: int = 10,
        width: int = 64,
        *,
        field: str = "conv",
        downsample: int = 1,
        solver="dopri5",
        rtol: float | None = None,
        atol: float | None = None,
        dt: float | None = None,
        controller=None,
        gradient="direct",
        augment_dim: int = 0,
        max_steps: int | None = None,
    ) -> None:
        super().__init__()
        in_shape = tuple(in_shape)
        if len(in_shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in in_shape
        ):
            raise ValueError(f"in_shape must be (C, H, W) of positive ints, got {in_shape!r}")
        check_positive_int(n_classes, "n_classes", minimum=2)
        check_positive_int(width, "width")
        check_positive_int(downsample, "downsample", minimum=0)
        check_positive_int(augment_dim, "augment_dim", minimum=0)
        if field not in ("conv", "mlp"):
            raise ValueError(f"field must be 'conv' or 'mlp', got {field!r}")
        self.in_shape = in_shape
        self.field = field
        state = width + augment_dim
        if field == "conv":
            C, H, W = in_shape
            if min(H, W) < 2**downsample:
                raise ValueError(
                    f"downsample={downsample} halves a {H}x{W} image {downsample} times; use "
                    f"at most {int(math.log2(min(H, W)))}"
                )
            layers: list[nn.Module] = [nn.Conv2d(C, width, 3, 1, 1)]
            for _ in range(downsample):
                layers += [_norm(width), nn.ReLU(), nn.Conv2d(width, width, 4, 2, 1)]
            self.downsampling = nn.Sequential(*layers)
            func = ConvVectorField(state)
            self.head = nn.Sequential(
                _norm(width),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(width, n_classes),
            )
        else:
            self.downsampling = nn.Sequential(
                nn.Flatten(), nn.Linear(math.prod(in_shape), width), nn.Tanh()
            )
            func = MLPVectorField(state, hidden=2 * width, n_layers=2, time_dependent=True)
            self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_classes))
        self.ode = NeuralODE(
            func,
            solver=solver,
            rtol=rtol,
            atol=atol,
            dt=dt,
            controller=controller,
            gradient=gradient,
            augment_dim=augment_dim,
            max_steps=max_steps,
        )

    @property
    def nfe_forward(self) -> int | None:
        """Evaluations of the ODE block's vector field in the last forward pass."""
        return self.ode.nfe_forward

    @property
    def nfe_backward(self) -> int | None:
        """Evaluations in the backward pass through the last forward pass (after backward)."""
        return self.ode.nfe_backward

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ODE block's output ``(B, width, h, w)`` (conv) or ``(B, width)`` (mlp)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self.in_shape))}) to match in_shape, "
                f"got {tuple(x.shape)}"
            )
        return self.ode.final(self.downsampling(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, n_classes)`` for images ``x: (B, C, H, W)``.

        Raises
        ------
        TypeError
            If ``x`` is not a floating tensor.
        ValueError
            If ``x.shape[1:]`` differs from ``in_shape``.
        """
        _check_dtype(self, x)
        return self.head(self.features(x))
