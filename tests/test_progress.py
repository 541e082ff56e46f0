"""The search's live view, driven by the Tune events it receives (no Ray needed)."""

import io

from rich.console import Console

from mae_search.search.progress import SearchProgress
from tests.conftest import ASHA_BLR_BODY, micro_space


class Trial:
    def __init__(self, trial_id, blr):
        self.trial_id, self.config = trial_id, {"optim.blr": blr, "seed": 0}


def test_view_lists_trials_with_values_in_table_units_and_counts(tmp_path):
    from mae_search.search.space import load_search_space

    space = load_search_space(micro_space(tmp_path, "view", ASHA_BLR_BODY.format(num_samples=3)))
    out = io.StringIO()
    view = SearchProgress(space, max_epochs=3, console=Console(file=out, width=80))  # not a terminal
    view.setup()
    good, bad = Trial("a", 5e-3), Trial("b", 1e-7)
    for trial in (good, bad):
        view.on_trial_start(0, [], trial)
    for epoch in (1, 2, 3):
        view.on_trial_result(0, [], good, {"epoch": epoch, "loss": 1.0 / epoch})
    view.on_trial_result(0, [], bad, {"epoch": 1, "loss": 1.5})
    view.on_trial_complete(0, [], good)
    view.on_trial_complete(0, [], bad)
    lines = out.getvalue().splitlines()
    # Not a terminal: one line per finished trial, with the "k / N" count.
    assert lines[0].startswith("[1/3] blr=0.005 seed=0: completed, train loss (last epoch) 0.3333")
    assert lines[1].startswith("[2/3] blr=1e-07 seed=0: stopped at 1, train loss (last epoch) 1.5000")
    assert "2 / 3 trials done" in lines[1]
    screen = io.StringIO()
    Console(file=screen, width=80).print(view.render())
    table = screen.getvalue()
    assert all(len(line) <= 80 for line in table.splitlines()) and "…" not in table
    assert "blr=0.005 seed=0" in table and "3/3" in table and "stopped at 1" in table


def test_a_resumed_search_counts_on_from_the_trials_it_recorded(tmp_path):
    """Resumed with 5 of 6 trials recorded, the view starts at 5 done and the last trial is [6/6]."""
    from mae_search.search.search_dir import SearchDir
    from tests.test_report import FakeTrial, record

    record(tmp_path, with_mlflow=False, drop={"t5"})  # t5 (ratio 0.9, seed 1) never ran
    search_dir = SearchDir.of(tmp_path / "results", "fixture-ablation")
    from mae_search.search.space import SearchSpace

    space = SearchSpace.model_validate_json(search_dir.space_file.read_text())
    out = io.StringIO()
    view = SearchProgress(space, max_epochs=3, console=Console(file=out, width=120), search_dir=search_dir)
    view.setup()
    assert view.done() == 5
    last = FakeTrial("t5", {"masking.mask_ratio": 0.9, "seed": 1})
    view.on_trial_start(0, [], last)
    view.on_trial_result(0, [], last, {"epoch": 3, "linear_probe_acc": 0.5})
    view.on_trial_complete(0, [], last)
    assert out.getvalue().startswith("[6/6] mask_ratio=0.9 seed=1: completed")
    assert "6 / 6 trials done" in out.getvalue()
