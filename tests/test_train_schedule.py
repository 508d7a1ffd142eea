"""The lr schedule: linear warmup and decay, with a horizon a time-capped run fits to the steps it will reach."""

from __future__ import annotations

import torch

from ray_e5.train.engines import WarmupLinearDecay, fitted_horizon, linear_schedule, set_horizon


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedule_warms_up_then_decays_to_zero_at_the_horizon():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = linear_schedule(opt, warmup_steps=2, total_steps=6)
    lrs = _lrs(sched, opt, 7)
    assert lrs[:3] == [0.0, 0.5, 1.0]
    assert lrs[3] > lrs[4] > lrs[5] > 0.0
    assert lrs[6] == 0.0


def test_a_shorter_horizon_ends_the_decay_earlier_and_survives_a_resume():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = linear_schedule(opt, warmup_steps=1, total_steps=100)
    _lrs(sched, opt, 3)
    set_horizon(sched, 6)  # the time limit will stop the run at step 6, not 100
    lrs = _lrs(sched, opt, 4)
    assert lrs[-1] == 0.0 and lrs[0] > lrs[1] > lrs[2] > 0.0
    # LambdaLR saves a callable object's attributes: a resumed run keeps the fitted horizon
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = linear_schedule(opt2, warmup_steps=1, total_steps=100)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.lr_lambdas[0].horizon == 6


def test_fitted_horizon_counts_the_steps_that_start_before_the_deadline():
    assert fitted_horizon(step=10, total_steps=500, seconds_per_step=30.0, seconds_left=95.0) == 14
    assert fitted_horizon(step=10, total_steps=12, seconds_per_step=30.0, seconds_left=600.0) == 12
    assert fitted_horizon(step=10, total_steps=500, seconds_per_step=30.0, seconds_left=-5.0) == 11
    assert WarmupLinearDecay(warmup=50, horizon=10).warmup == 9  # warmup never reaches past the horizon
