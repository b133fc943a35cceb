"""Latent ODE with an ODE-RNN encoder for irregularly sampled, partially observed series."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import MLPVectorField, NFECounter, SolverSettings, check_positive_int, solve_tracked
from .ode_rnn import ODERNN

__all__ = ["LatentODE"]

_LOG_2PI = math.log(2 * math.pi)


class LatentODE(nn.Module):
    """Latent ODE (VAE over initial latent states) for :class:`~neuralode.data.IrregularBatch`.

    Generative model: ``z0 ~ N(0, I)`` at time ``t0``; ``dz/dt = f(z)`` (autonomous MLP);
    ``x(t) ~ N(g(z(t)), sigma^2)`` independently per observed channel. Recognition model: an
    :class:`ODERNN` run backward in time over the observed points (and on to ``t0``) gives
    ``q(z0 | x) = N(mu, diag(std^2))``. Each sample's trajectory is decoded on its own time
    grid with one per-sample solve from ``t0``.

    Time origin: ``z0`` is the latent state at ``t0`` (default 0), the same for every sample;
    all valid times must be ``>= t0`` (they are checked, ``ValueError`` otherwise). Series that
    start later than ``t0`` are fine: the encoder integrates back to ``t0``. For
    :func:`~neuralode.data.load_pbcseq` every patient's first visit is at time 0.

    Parameters
    ----------
    n_channels : int
        Channels ``C`` of the data.
    latent_dim : int, default 8
        Size ``L`` of ``z``.
    rec_hidden : int, default 24
        Hidden size of the ODE-RNN encoder.
    ode_hidden : int, default 32
        Width of the encoder's and the decoder's MLP vector fields (2 linear layers, tanh).
    decoder_hidden : int, default 0
        Hidden width of the observation model ``g``; 0 means linear (as in Rubanova et al.).
    obs_std : float or "learned", default "learned"
        Observation noise ``sigma`` (in the data's units, e.g. normalised units): a fixed
        positive number, or one learned value per channel (initialised at 0.5, bounded below by
        0.01 so the likelihood cannot collapse on a channel).
    classify : bool, default False
        Add a classification head on ``z0`` (an MLP to one logit) trained with binary
        cross-entropy on ``batch.labels`` where they are not NaN.
    t0 : float, default 0.0
        Time of ``z0``, in the data's time units.
    solver, rtol, atol, dt, controller, gradient, max_steps
        Solver settings of the encoder's and the decoder's solves (see :class:`NeuralODE`);
        defaults ``"dopri5"``, 1e-3, 1e-4, direct gradients.

    Attributes
    ----------
    encoder : ODERNN
    decoder_field : MLPVectorField
    nfe_forward, nfe_backward : int or None
        Vector field evaluations of the last encoder and decoder calls together (backward:
        after ``loss.backward()``).

    Raises
    ------
    ValueError, TypeError
        For non-positive sizes, an invalid ``obs_std`` or invalid solver settings.

    Examples
    --------
    >>> from neuralode.models import LatentODE
    >>> model = LatentODE(n_channels=12, latent_dim=8)  # doctest: +SKIP
    >>> out = model.loss(batch)  # doctest: +SKIP
    >>> out["loss"].backward()  # doctest: +SKIP
    >>> mean, std = model.predict(batch, torch.linspace(0, 10, 50))  # doctest: +SKIP

    References
    ----------
    Rubanova, Chen, Duvenaud, "Latent ODEs for Irregularly-Sampled Time Series", NeurIPS 2019
    (the model: ODE-RNN encoder run backward in time, Gaussian q(z0), autonomous latent
    dynamics, linear decoder, masked Gaussian likelihood, IWAE bound with k samples,
    interpolation / extrapolation tasks, classification from z0). Chen et al., "Neural Ordinary
    Differential Equations", NeurIPS 2018, section 5 (the latent ODE time-series model).
    Burda, Grosse, Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016 (``iwae=True``).
    """

    def __init__(
        self,
        n_channels: int,
        latent_dim: int = 8,
        *,
        rec_hidden: int = 24,
        ode_hidden: int = 32,
        decoder_hidden: int = 0,
        obs_std: float | str = "learned",
        classify: bool = False,
        t0: float = 0.0,
        solver="dopri5",
        rtol: float | None = None,
        atol: float | None = None,
        dt: float | None = None,
        controller=None,
        gradient="direct",
        max_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.n_channels = check_positive_int(n_channels, "n_channels")
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        check_positive_int(rec_hidden, "rec_hidden")
        check_positive_int(ode_hidden, "ode_hidden")
        check_positive_int(decoder_hidden, "decoder_hidden", minimum=0)
        if not isinstance(t0, (int, float)) or isinstance(t0, bool) or not math.isfinite(t0):
            raise ValueError(f"t0 must be a finite float, got {t0!r}")
        self.t0 = float(t0)
        solver_kw = dict(
            solver=solver,
            rtol=rtol,
            atol=atol,
            dt=dt,
            controller=controller,
            gradient=gradient,
            max_steps=max_steps,
        )
        self.settings = SolverSettings(**solver_kw)
        self.encoder = ODERNN(n_channels, rec_hidden, ode_hidden=ode_hidden, **solver_kw)
        self.to_posterior = nn.Linear(rec_hidden, 2 * latent_dim)
        self.decoder_field = MLPVectorField(latent_dim, ode_hidden, 2, "tanh")
        if decoder_hidden:
            self.observation = nn.Sequential(
                nn.Linear(latent_dim, decoder_hidden),
                nn.Tanh(),
                nn.Linear(decoder_hidden, n_channels),
            )
        else:
            self.observation = nn.Linear(latent_dim, n_channels)
        if obs_std == "learned":
            # softplus(raw) + 0.01 = 0.5 at initialisation.
            self.obs_std_raw = nn.Parameter(torch.full((n_channels,), math.log(math.expm1(0.49))))
            self.fixed_obs_std = None
        elif isinstance(obs_std, (int, float)) and not isinstance(obs_std, bool) and obs_std > 0:
            self.register_parameter("obs_std_raw", None)
            self.fixed_obs_std = float(obs_std)
        else:
            raise ValueError(f"obs_std must be a positive float or 'learned', got {obs_std!r}")
        self.classifier = None
        if classify:
            self.classifier = nn.Sequential(
                nn.Linear(latent_dim, 2 * latent_dim), nn.ReLU(), nn.Linear(2 * latent_dim, 1)
            )
        self._counter = NFECounter()

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def nfe_forward(self) -> int | None:
        parts = [
            self.encoder.nfe_forward,
            self._counter.forward if self._counter.n_solves else None,
        ]
        parts = [p for p in parts if p is not None]
        return sum(parts) if parts else None

    @property
    def nfe_backward(self) -> int | None:
        parts = [p for p in (self.encoder.nfe_backward, self._counter.backward) if p is not None]
        return sum(parts) if parts else None

    @property
    def obs_std(self) -> torch.Tensor:
        """Observation noise per channel, shape ``(C,)``."""
        p = self.to_posterior.weight
        if self.fixed_obs_std is not None:
            return torch.full(
                (self.n_channels,), self.fixed_obs_std, dtype=p.dtype, device=p.device
            )
        return F.softplus(self.obs_std_raw) + 0.01

    def _check_batch(self, batch) -> None:
        from neuralode.data import IrregularBatch  # lazy: keep `import neuralode.models` light

        if not isinstance(batch, IrregularBatch):
            raise TypeError(f"batch must be an IrregularBatch, got {type(batch).__name__}")
        if batch.n_channels != self.n_channels:
            raise ValueError(
                f"batch has {batch.n_channels} channels but the model was built with "
                f"n_channels={self.n_channels}"
            )
        tv = batch.times.detach()[batch.valid]
        if tv.numel() and float(tv.min()) < self.t0:
            raise ValueError(
                f"all valid times must be >= t0 = {self.t0} (z0 is the latent state at t0); got "
                f"a time {float(tv.min())}. Shift the series (e.g. times - times[:, :1]) or build "
                "the model with a smaller t0"
            )

    def _check_mask(self, mask, batch, name: str) -> torch.Tensor:
        if mask is None:
            return batch.mask
        if not isinstance(mask, torch.Tensor) or mask.shape != batch.mask.shape:
            raise ValueError(
                f"{name} must be a tensor of shape (B, T, C) = {tuple(batch.mask.shape)}, got "
                f"{getattr(mask, 'shape', type(mask).__name__)}"
            )
        return mask.to(batch.mask.dtype)

    # -- model pieces --------------------------------------------------------------------------
    def encode(self, batch, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``q(z0 | x)`` from the observed entries.

        Parameters
        ----------
        batch : IrregularBatch
            ``C = n_channels`` channels, times ``>= t0``, the model's dtype.
        mask : Tensor ``(B, T, C)``, optional
            Entries the encoder may see (default ``batch.mask``); values elsewhere are ignored.

        Returns
        -------
        mu, std : Tensor, shape ``(B, L)``
            Mean and standard deviation (> 0) of ``q(z0)``.

        Raises
        ------
        TypeError, ValueError
            For a non-batch, a wrong channel count or dtype, times before ``t0`` or a ``mask``
            of the wrong shape.
        """
        self._check_batch(batch)
        m = self._check_mask(mask, batch, "mask")
        _, h = self.encoder.forward_batch(batch, reverse=True, mask=m, t_end=self.t0)
        mu, raw = self.to_posterior(h).chunk(2, dim=-1)
        return mu, F.softplus(raw) + 1e-4

    def decode(self, z0: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """Observation means ``g(z(t))`` along the latent trajectories from ``z0`` at ``t0``.

        Parameters
        ----------
        z0 : Tensor, shape ``(K, B, L)`` or ``(B, L)``
            Initial latent states (``K`` posterior samples per sample).
        times : Tensor, shape ``(B, Q)`` or ``(Q,)``
            Query times ``>= t0``, non-decreasing along each row (repeats allowed).

        Returns
        -------
        Tensor, shape ``(K, B, Q, C)`` (or ``(B, Q, C)`` for a 2-D ``z0``)

        Raises
        ------
        ValueError
            For mismatched shapes, times before ``t0`` or decreasing times.
        """
        squeeze = z0.dim() == 2
        z = z0[None] if squeeze else z0
        if z.dim() != 3 or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"z0 must have shape (K, B, L) or (B, L) with L = {self.latent_dim}, got "
                f"{tuple(z0.shape)}"
            )
        K, B, L = z.shape
        tq = torch.as_tensor(times).detach().to(torch.float64)
        if tq.dim() == 1:
            tq = tq.expand(B, -1)
        if tq.dim() != 2 or tq.shape[0] != B:
            raise ValueError(
                f"times must have shape (B, Q) = ({B}, Q) or (Q,), got {tuple(tq.shape)}"
            )
        if tq.numel() and float(tq.min()) < self.t0:
            raise ValueError(f"query times must be >= t0 = {self.t0}, got {float(tq.min())}")
        if bool((tq[:, 1:] < tq[:, :-1]).any()):
            raise ValueError("query times must be non-decreasing along each row; sort them")
        grid = torch.cat([torch.full_like(tq[:, :1], self.t0), tq], dim=1).repeat(K, 1)
        self._counter.reset()
        zs = solve_tracked(
            self.settings, self._counter, self.decoder_field, z.reshape(K * B, L), grid
        )
        zs = zs[1:].reshape(tq.shape[1], K, B, L).permute(1, 2, 0, 3)  # (K, B, Q, L)
        x = self.observation(zs)
        return x[0] if squeeze else x

    def _log_lik(self, x_hat, values, mask):
        """Masked Gaussian log density per (K, B), summed over the observed entries."""
        std = self.obs_std.to(x_hat.dtype)
        logp = -0.5 * (((values - x_hat) / std) ** 2 + 2 * torch.log(std) + _LOG_2PI)
        return (logp * mask).sum(dim=(-2, -1))

    # -- objectives ----------------------------------------------------------------------------
    def forward(self, batch, **kwargs) -> dict:
        """Same as :meth:`loss` (so that the model can be called, e.g. under DDP)."""
        return self.loss(batch, **kwargs)

    def loss(
        self,
        batch,
        *,
        n_samples: int = 1,
        iwae: bool = False,
        kl_weight: float = 1.0,
        bce_weight: float = 1.0,
        t_split=None,
        encoder_mask: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The (negative) evidence lower bound and its parts on a batch.

        Interpolation (default): encode the observed entries and score them all.
        Extrapolation (``t_split``): encode only entries at times ``<= t_split`` and score those
        after it (:meth:`IrregularBatch.split_time`). ``encoder_mask`` / ``target_mask``
        choose the two sets explicitly (e.g. encode a random half of the points, score all).

        Parameters
        ----------
        batch : IrregularBatch
        n_samples : int, default 1
            Posterior samples ``K`` of ``z0`` per series.
        iwae : bool, default False
            Use the importance-weighted bound ``log mean_k p(x, z_k) / q(z_k)`` (needs
            ``kl_weight == 1``) instead of ``mean_k log p(x | z_k) - KL``.
        kl_weight : float, default 1.0
            Weight of the KL term (for KL annealing).
        bce_weight : float, default 1.0
            Weight of the classification loss (``classify=True`` only).
        t_split : float or Tensor ``(B,)``, optional
            Extrapolation split time (not together with the masks).
        encoder_mask, target_mask : Tensor ``(B, T, C)``, optional
            Entries to encode and to score (default: ``batch.mask`` for both).
        generator : torch.Generator, optional
            Randomness of the posterior samples.

        Returns
        -------
        dict of 0-d Tensors
            ``loss``: the objective to minimise, ``-sum_b elbo_b / n_obs`` (the bound per
            scored entry, with the KL term weighted by ``kl_weight``) ``+ bce_weight * bce``;
            ``elbo`` (unweighted), ``log_lik``, ``kl``: batch means of
            the per-series bound, summed log-likelihood of the scored entries and
            ``KL(q(z0) || N(0, I))`` (nats; ``kl`` is the analytical KL also with ``iwae``);
            ``mse``: mean squared error of the decoded means over the scored entries;
            ``n_obs``: number of scored entries; with ``classify=True`` also ``bce`` (mean over
            labelled series, 0 when none is labelled) and ``accuracy``. Only ``loss`` carries a
            graph; the other entries are detached, for logging.

        Raises
        ------
        TypeError, ValueError
            As :meth:`encode`; for ``t_split`` together with a mask, ``n_samples < 1``,
            ``iwae`` with ``kl_weight != 1``, or ``classify=True`` with ``batch.labels`` None.
        """
        out = self._objective(
            batch,
            n_samples=n_samples,
            iwae=iwae,
            kl_weight=kl_weight,
            bce_weight=bce_weight,
            t_split=t_split,
            encoder_mask=encoder_mask,
            target_mask=target_mask,
            generator=generator,
        )
        return {k: v if k == "loss" else v.detach() for k, v in out.items()}

    def elbo(self, batch, **kwargs) -> torch.Tensor:
        """Batch mean of the per-series evidence lower bound (nats), differentiable.

        Takes the keyword arguments of :meth:`loss` (and raises the same errors).
        """
        return self._objective(batch, **kwargs)["elbo"]

    def _objective(
        self,
        batch,
        *,
        n_samples: int = 1,
        iwae: bool = False,
        kl_weight: float = 1.0,
        bce_weight: float = 1.0,
        t_split=None,
        encoder_mask: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        check_positive_int(n_samples, "n_samples")
        if iwae and kl_weight != 1.0:
            raise ValueError("iwae=True is a bound only with kl_weight=1.0")
        self._check_batch(batch)
        if t_split is not None:
            if encoder_mask is not None or target_mask is not None:
                raise ValueError("pass either t_split or encoder_mask/target_mask, not both")
            encoder_mask, target_mask = batch.split_time(t_split)
        enc_m = self._check_mask(encoder_mask, batch, "encoder_mask")
        tgt_m = self._check_mask(target_mask, batch, "target_mask")
        if self.classifier is not None and batch.labels is None:
            raise ValueError("classify=True needs batch.labels (the batch has none)")

        mu, std = self.encode(batch, enc_m)
        eps = torch.randn(
            (n_samples, *mu.shape), generator=generator, dtype=mu.dtype, device=mu.device
        )
        z0 = mu + std * eps  # (K, B, L)
        x_hat = self.decode(z0, batch.times)  # (K, B, T, C)
        log_lik = self._log_lik(x_hat, batch.values, tgt_m)  # (K, B)
        kl = (0.5 * (mu**2 + std**2 - 1) - torch.log(std)).sum(-1)  # (B,)
        if iwae:
            log_w = log_lik + (-0.5 * (z0**2 - eps**2)).sum(-1) + torch.log(std).sum(-1)
            elbo = objective = torch.logsumexp(log_w, 0) - math.log(n_samples)
        else:
            elbo = log_lik.mean(0) - kl
            objective = elbo if kl_weight == 1.0 else log_lik.mean(0) - kl_weight * kl
        n_obs = tgt_m.sum()
        sq = ((x_hat - batch.values) ** 2 * tgt_m).sum(dim=(-2, -1)).mean(0)
        out = {
            "elbo": elbo.mean(),
            "log_lik": log_lik.mean(),
            "kl": kl.mean(),
            "mse": sq.sum() / n_obs.clamp_min(1),
            "n_obs": n_obs.detach(),
        }
        loss = -objective.sum() / n_obs.clamp_min(1)
        if self.classifier is not None:
            logits = self.classifier(z0).squeeze(-1)  # (K, B)
            labelled = ~torch.isnan(batch.labels)
            y = torch.nan_to_num(batch.labels, 0.0).to(logits.dtype).expand_as(logits)
            bce_all = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)
            n_lab = labelled.sum().clamp_min(1)
            out["bce"] = (bce_all * labelled).sum() / n_lab
            correct = ((logits.mean(0) > 0) == (y[0] > 0.5)) & labelled
            out["accuracy"] = correct.sum().to(logits.dtype) / n_lab
            loss = loss + bce_weight * out["bce"]
        out["loss"] = loss
        return out

    # -- prediction ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        batch,
        query_times: torch.Tensor | None = None,
        *,
        n_samples: int = 16,
        t_split=None,
        encoder_mask: torch.Tensor | None = None,
        observation_noise: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior predictive mean and standard deviation of the series.

        Parameters
        ----------
        batch : IrregularBatch
        query_times : Tensor ``(Q,)`` or ``(B, Q)``, optional
            Times to predict at (``>= t0``, non-decreasing). Default: ``batch.times``
            (reconstruct the observed time points).
        n_samples : int, default 16
            Posterior samples of ``z0``.
        t_split : float or Tensor ``(B,)``, optional
            Extrapolation: condition only on entries at times ``<= t_split``.
        encoder_mask : Tensor ``(B, T, C)``, optional
            Entries to condition on (default ``batch.mask``; not with ``t_split``).
        observation_noise : bool, default False
            Add the observation variance ``obs_std**2`` to the spread of the decoded means.

        Returns
        -------
        mean, std : Tensor, shape ``(B, Q, C)``
            Mean and standard deviation over the ``z0`` samples of ``g(z(t))`` (plus noise
            when asked), in the data's (e.g. normalised) units.

        Raises
        ------
        TypeError, ValueError
            As :meth:`encode` and :meth:`decode`.
        """
        check_positive_int(n_samples, "n_samples")
        self._check_batch(batch)
        if t_split is not None:
            if encoder_mask is not None:
                raise ValueError("pass either t_split or encoder_mask, not both")
            encoder_mask, _ = batch.split_time(t_split)
        mu, std = self.encode(batch, encoder_mask)
        eps = torch.randn(
            (n_samples, *mu.shape), generator=generator, dtype=mu.dtype, device=mu.device
        )
        x = self.decode(mu + std * eps, batch.times if query_times is None else query_times)
        mean = x.mean(0)
        var = x.var(0, unbiased=False)
        if observation_noise:
            var = var + self.obs_std.to(var.dtype) ** 2
        return mean, var.sqrt()

    @torch.no_grad()
    def predict_proba(self, batch, encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Probability of label 1 per series from the posterior mean of ``z0``, shape ``(B,)``.

        Raises
        ------
        ValueError
            If the model was built without ``classify=True``.
        """
        if self.classifier is None:
            raise ValueError("predict_proba needs a model built with classify=True")
        mu, _ = self.encode(batch, encoder_mask)
        return torch.sigmoid(self.classifier(mu).squeeze(-1))
