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
