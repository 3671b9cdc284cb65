"""The monitoring run's week axis: MLflow steps map to H&M weeks and back exactly."""

from __future__ import annotations

import datetime as dt

from hm_recsys.monitor import step_week, week_step


def test_week_steps_round_trip_on_wednesdays():
    weeks = [dt.date(2020, 9, 16) - dt.timedelta(weeks=i) for i in range(110)]  # two years of H&M weeks
    steps = [week_step(w) for w in weeks]
    assert [step_week(s) for s in steps] == weeks
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == len(steps)
    assert all(step_week(s).weekday() == 2 for s in steps)  # Wednesday, where an H&M week starts
    assert week_step(dt.date(2020, 9, 16)) - week_step(dt.date(2020, 9, 9)) == 1
