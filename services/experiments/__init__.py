"""Experiments (issue 6): the pure statistics, allocation and registry rules.

One concept per module: `inputs` (arm counts and their parsing), `frequentist`
(z-test, intervals, sample size, sample-ratio mismatch), `bayesian`
(Beta-Binomial P(B > A), expected loss, credible intervals, stopping rule),
`bandit` (Thompson, top-two Thompson, epsilon-greedy, P(best), value
remaining), `allocation` (deterministic FNV-1a buckets, namespaces), `registry`
(experiment records folded into state, collision rule), `report` (the two-arm
summary behind `clickloop stats ab`) and `seeding` (seeds that are returned).

None of them does I/O, reads the clock or imports faust, aiokafka, redis or
aiohttp: randomness is a seed or a numpy Generator passed in, and every Monte
Carlo result carries the seed it was drawn with.
"""
from __future__ import annotations


class ExperimentError(ValueError):
    """Root of the package's errors: a bad input, record or request, with the reason."""
