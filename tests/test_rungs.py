"""Rung fidelity: does the metric at each ASHA rung rank trials as their final metric does?"""

import pandas as pd

from mae_search.report.render import Report, render_markdown
from mae_search.report.rungs import rung_correlations, rung_epochs, rung_fidelity_table
from mae_search.search.space import SearchSpace


def space(**scheduler) -> SearchSpace:
    return SearchSpace.model_validate({
        "name": "r", "base": {"epochs": 4}, "metric": "val_linear_probe_acc", "mode": "max", "num_samples": 8,
        "dimensions": {"optim.blr": {"loguniform": [1e-4, 1e-2]}},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2, **scheduler}})


def test_rungs_are_asha_milestones_below_the_last_epoch():
    assert rung_epochs(space()) == [1, 2]
    assert rung_epochs(space(reduction_factor=3)) == [1, 3]
    assert rung_epochs(space(grace_period=2, reduction_factor=1.5)) == [2, 3]  # milestone 3.0; 4.5 is past 4
    assert rung_epochs(space().model_copy(update={"scheduler": space().scheduler.model_copy(
        update={"type": "none"})})) == []


def planted() -> pd.DataFrame:
    """Six trials that ran to epoch 4 and one ASHA stopped at epoch 1. Epoch 2 ranks the six as epoch 4
    does (with uneven gaps); epoch 1 ranks them in reverse."""
    final = [0.31, 0.12, 0.55, 0.47, 0.20, 0.38]
    rows = []
    for i, acc in enumerate(final):
        at = {1: 0.9 - acc**1.5, 2: acc**2 + 0.05, 3: acc * 0.9, 4: acc}
        rows += [{"search": "r", "trial_id": f"t{i}", "status": "completed", "epoch": e, "val_linear_probe_acc": v}
                 for e, v in at.items()]
    rows.append({"search": "r", "trial_id": "stopped", "status": "stopped_early", "epoch": 1,
                 "val_linear_probe_acc": 0.9})
    rows.append({"search": "r", "trial_id": "ref", "status": "reference", "epoch": 0, "val_linear_probe_acc": 0.1})
    return pd.DataFrame(rows)


def test_report_gives_each_rungs_rank_correlation_and_warns_on_an_untrustworthy_one():
    table = planted()
    assert [(rung, n, round(rho, 6)) for rung, n, rho in rung_correlations(space(), table)] == [
        (1, 6, -1.0), (2, 6, 1.0)]
    report = Report("r")
    rung_fidelity_table(space(), table, report)
    text = render_markdown(report)
    assert "| 1 | 6 | -1.00 |" in text and "| 2 | 6 | 1.00 |" in text
    assert "early stopping at epoch 1 (ρ = -1.00, n = 6) was close to random" in text
    assert "epoch 2 (" not in text


def test_too_few_finished_trials_are_said_not_guessed():
    table = planted()
    table = table[table["trial_id"].isin(["t0", "t1", "stopped"])]
    report = Report("r")
    rung_fidelity_table(space(), table, report)
    text = render_markdown(report)
    assert "| 1 | 2 | - |" in text and "Too few trials completed to measure the rungs at epoch 1, 2" in text
    assert "Warning" not in text
