"""The gradient policies: each a :class:`hatnorm.GradientPolicy` registered under a name
(:func:`hatnorm.list_policies`, built by :func:`hatnorm.create_policy`), and the options they take.

:class:`StepPolicy` is the base of a policy whose rates change every step; :class:`SoftRatePolicy` the base of
AdaHAT's reference form and FG-AdaHAT.
"""

from hatnorm._attribution import ATTRIBUTIONS as ATTRIBUTION_TYPES
from hatnorm._importance import TYPES as IMPORTANCE_TYPES
from hatnorm._policies import AdaHATPolicy, HATPolicy
from hatnorm._soft_policies import ADAHAT_MODES, SCHEDULERS, SUMMING_STRATEGIES, AdaHATReferencePolicy, FGAdaHATPolicy
from hatnorm._step_policy import SoftRatePolicy, StepPolicy

__all__ = [
    "ADAHAT_MODES",
    "ATTRIBUTION_TYPES",
    "IMPORTANCE_TYPES",
    "SCHEDULERS",
    "SUMMING_STRATEGIES",
    "AdaHATPolicy",
    "AdaHATReferencePolicy",
    "FGAdaHATPolicy",
    "HATPolicy",
    "SoftRatePolicy",
    "StepPolicy",
]
