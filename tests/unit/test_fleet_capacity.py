"""The fleet's capacity (lb/capacity.py, fleet_capacity): its backends' slots
pooled, as a balancer that sends each request where it waits least pools
them, or their capacities summed if that is more."""

from __future__ import annotations

import math

from lb.capacity import _mixture_ratio, estimate, fleet_capacity

SLO = 0.25


def test_a_mixture_of_one_lognormal_is_that_lognormal():
    sigma = 0.4
    ratio = _mixture_ratio([(3.0, 0.02, sigma), (1.0, 0.02, sigma)])
    assert abs(ratio / math.exp(2.326 * sigma) - 1) < 1e-3
    # a slower part widens it
    assert _mixture_ratio([(3.0, 0.02, sigma), (1.0, 0.08, sigma)]) > ratio


def test_pooled_slots_take_more_than_the_same_slots_apart():
    one = estimate(1, 0.030, math.exp(2.326 * 0.3), SLO, True)
    two_apart = 2 * one.capacity_rps
    fleet = fleet_capacity([one, one], SLO)
    # two single-slot backends behind a balancer queue like one two-slot backend
    pooled = estimate(2, 0.030, math.exp(2.326 * 0.3), SLO, True).capacity_rps
    assert fleet > two_apart * 1.05
    assert abs(fleet / pooled - 1) < 1e-3
    assert fleet < 2 * one.saturation_rps


def test_the_sum_stands_when_pooling_would_say_less():
    fast = estimate(4, 0.010, 1.5, SLO, True)
    hopeless = estimate(1, 0.200, 3.0, SLO, True)  # its service alone misses the objective
    assert hopeless.capacity_rps == 0.0
    assert fleet_capacity([fast, hopeless], SLO) >= fast.capacity_rps
    assert fleet_capacity([fast], SLO) == fast.capacity_rps
    assert fleet_capacity([], SLO) == 0.0
