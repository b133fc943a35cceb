"""Settings shared by every test process.

One intra-op thread per process: ``make test`` runs two pytest-xdist workers on two cores, and
torch's default (one thread per core in each worker) oversubscribes them, which on a loaded
machine slows the suite several times over. It also makes every result independent of the
machine's core count (reductions and matrix products split their work by thread count).
Tests that need another thread count set it themselves.
"""

import torch

torch.set_num_threads(1)
