"""Sampling a ``Transport``: path-agnostic ODE/SDE solvers, the ``Sampler`` that builds their drifts, classifier-free
guidance and the likelihood.

- ``integrators``: ``ode_solve`` (torchdiffeq) and ``sde_solve`` (Euler-Maruyama, Heun) of any drift and diffusion.
- ``sampler``: ``Sampler(transport).sample_ode/sample_sde`` turn the network's prediction into those drifts.
- ``guidance``: ``classifier_free_guidance`` around a network.
- ``likelihood``: ``nll_bits_per_dim`` by the probability-flow ODE.
- ``model_calls``: the counted, checked network call they share.
"""

from zigma.sampling.guidance import classifier_free_guidance
from zigma.sampling.integrators import OdeMethod, SdeMethod, ode_solve, sde_solve
from zigma.sampling.likelihood import LikelihoodResult, nll_bits_per_dim
from zigma.sampling.sampler import LastStep, Sampler, SampleResult

__all__ = [
    "LastStep",
    "LikelihoodResult",
    "OdeMethod",
    "SampleResult",
    "Sampler",
    "SdeMethod",
    "classifier_free_guidance",
    "nll_bits_per_dim",
    "ode_solve",
    "sde_solve",
]
