"""EK-FAC influence queries: which training examples most influenced this output.

Grosse et al. 2023 ("Studying Large Language Model Generalization with Influence Functions")
score a training example ``m`` against a query ``q`` by ``∇f_qᵀ (G + λI)⁻¹ ∇L_m`` with an EK-FAC
approximation ``G`` of the Gauss-Newton matrix. Typical use::

    from secondorder import influence

    task = influence.ClassificationTask()
    factors = influence.fit_factors(model, task, train_set, strategy="ekfac", output_dir="factors")
    result = influence.compute_pairwise_scores(model, task, factors, query_set, train_set)
    best = result.top_k(10)          # most helpful / most harmful training examples per query

Factors that ``secondorder.EKFAC`` accumulated while training can be reused:
``influence.InfluenceFactors.from_optimizer(optimizer)`` takes them as they are (running
averages over the last steps' parameters); ``refresh="factors"`` (with ``model``, ``task`` and
a data ``loader``) recomputes them at the final parameters in one pass, equal to a fresh fit,
and ``refresh="correction"`` only the EK-FAC correction in the optimizer's eigenbases
(:mod:`~secondorder.influence.refresh`).

Sign: with a loss measurement, positive = helpful (removing the example raises the query loss).
Units: raw scores are ``N ×`` the predicted change; :meth:`InfluenceScores.normalized` divides.
Modules: :mod:`~secondorder.influence.task` (the task protocol),
:mod:`~secondorder.influence.factors` (fitting stages and storage),
:mod:`~secondorder.influence.scores` (queries), :mod:`~secondorder.influence.statistics` (maths),
:mod:`~secondorder.influence.contraction` (the scoring inner loop),
:mod:`~secondorder.influence.exact` (dense curvature solves for small models: the reference),
:mod:`~secondorder.influence.evaluation` (LDS and leave-one-out against retraining),
:mod:`~secondorder.influence.streaming` (large training sets: chunks on disk, resume),
:mod:`~secondorder.influence.sharding` (how fitting and scoring split their work over
``torch.distributed`` ranks: data shards, one owner rank per layer for the eigendecomposition,
through the suite's distributor; ``distributor=`` as for the optimizers).
"""

from secondorder.influence.evaluation import (
    LDSResult,
    LeaveOneOutResult,
    evaluate_lds,
    evaluate_leave_one_out,
    leave_one_out_correlation,
    linear_datamodeling_score,
    subset_masks,
)
from secondorder.influence.exact import CURVATURES, exact_curvature, exact_scores
from secondorder.influence.factors import InfluenceFactors, fit_factors, load_factors
from secondorder.influence.refresh import REFRESH_MODES, refresh_factors
from secondorder.influence.scores import (
    InfluenceScores,
    TopK,
    compute_pairwise_scores,
    compute_self_scores,
    low_rank_factors,
    preconditioned_query_gradients,
)
from secondorder.influence.statistics import STRATEGIES, LayerPreconditioner
from secondorder.influence.streaming import load_streamed_scores, stream_pairwise_scores
from secondorder.influence.task import (
    ClassificationTask,
    InfluenceTask,
    LanguageModelTask,
    sample_labels,
)

__all__ = [
    "CURVATURES",
    "LDSResult",
    "LeaveOneOutResult",
    "REFRESH_MODES",
    "STRATEGIES",
    "evaluate_lds",
    "evaluate_leave_one_out",
    "exact_curvature",
    "exact_scores",
    "leave_one_out_correlation",
    "linear_datamodeling_score",
    "load_streamed_scores",
    "stream_pairwise_scores",
    "subset_masks",
    "ClassificationTask",
    "InfluenceFactors",
    "InfluenceScores",
    "InfluenceTask",
    "LanguageModelTask",
    "LayerPreconditioner",
    "TopK",
    "compute_pairwise_scores",
    "compute_self_scores",
    "fit_factors",
    "load_factors",
    "low_rank_factors",
    "preconditioned_query_gradients",
    "refresh_factors",
    "sample_labels",
]
