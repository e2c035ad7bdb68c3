"""Glue for training frameworks (optional dependencies, imported only when used).

* :mod:`secondorder.integrations.huggingface`: :class:`SecondOrderTrainer`, a
  ``transformers.Trainer`` that runs every optimizer of the suite (capture optimizers get
  ``model=``; SANIA and ExactGaussNewton get their closures).
* :mod:`secondorder.integrations.lightning`: :class:`ClosureOptimizerModule`, the manual
  optimization recipe for SANIA and ExactGaussNewton in Lightning, and
  :class:`ClosureOptimizerCheck`, a callback that refuses the automatic-optimization setups
  where they would silently get the wrong loss.

Install the packages with ``pip install secondorder[integrations]`` (keep your torch build:
pass a constraints file pinning it).
"""
