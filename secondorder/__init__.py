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

from secondorder.optimizers.adafisher import AdaFisher, AdaFisherW
from secondorder.optimizers.ekfac import EKFAC
from secondorder.optimizers.gauss_newton import ExactGaussNewton
from secondorder.optimizers.sania import SANIA
from secondorder.optimizers.shampoo import Shampoo
from secondorder.optimizers.singd import SINGD
from secondorder.precond.linalg import NumericalWarning

__all__ = [
    "AdaFisher",
    "AdaFisherW",
    "EKFAC",
    "ExactGaussNewton",
    "NumericalWarning",
    "SANIA",
    "SINGD",
    "Shampoo",
    "__version__",
]
