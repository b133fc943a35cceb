"""torch.compile's stance around compiled stepping's calls (see :mod:`neuralode._compiled`)."""

from __future__ import annotations

import torch

__all__ = ["Stance", "FAIL_ON_RECOMPILE", "DEFAULT_STANCE"]


class Stance:
    """``torch.compiler.set_stance(name)`` as a reusable context manager. The public one builds
    and validates its objects at every use (~10 us, 1% of a small training step); this one
    makes dynamo's stance object once and switches it with dynamo's own setter, where this
    torch has them (else it uses the public one)."""

    def __init__(self, name: str):
        self.name, self.stance, self.prior = name, None, []

    def __enter__(self):
        if self.stance is None:
            try:
                from torch._dynamo.eval_frame import DynamoStance, _set_stance

                self.stance, self.setter = DynamoStance(self.name), _set_stance
            except (ImportError, TypeError):  # (private API: the public context manager)
                self.stance, self.setter = False, None
        if self.stance is False:
            cm = torch.compiler.set_stance(self.name)
            cm.__enter__()
            self.prior.append(cm)
        else:
            self.prior.append(self.setter(self.stance))

    def __exit__(self, *exc):
        prior = self.prior.pop()
        if self.stance is False:
            prior.__exit__(*exc)
        else:
            self.setter(prior)


#: The stances of compiled stepping: no recompilation once compiled; the default to compile.
FAIL_ON_RECOMPILE, DEFAULT_STANCE = Stance("fail_on_recompile"), Stance("default")
