"""secondorder: second-order optimizers for PyTorch that drop in for torch.optim.Adam.

Public optimizers (each a ``torch.optim.Optimizer``)::

    Shampoo            distributed Shampoo with grafting and the eigenvalue-corrected (SOAP) mode
    EKFAC              eigenvalue-corrected K-FAC (George et al. 2018)
    AdaFisher          diagonal Kronecker Fisher in Adam's place (Gomes et al. 2025), AdaFisherW
    SINGD              structured inverse-free natural gradient (Lin et al. 2024)
    ExactGaussNewton   damped Gauss-Newton solved in the batch dimension (Korbit et al. 2024)
    SANIA              scale-invariant preconditioned Polyak step (Abdukhakimov et al. 2023)
"""

__version__ = "0.1.0"

from secondorder.optimizers.sania import SANIA  # noqa: E402

from secondorder.optimizers.shampoo import Shampoo  # noqa: E402

from secondorder.optimizers.singd import SINGD  # noqa: E402

from secondorder.optimizers.ekfac import EKFAC  # noqa: E402

from secondorder.optimizers.adafisher import AdaFisher, AdaFisherW  # noqa: E402

from secondorder.optimizers.gauss_newton import ExactGaussNewton  # noqa: E402
