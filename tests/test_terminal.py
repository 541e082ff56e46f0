"""The table a finished search prints, rendered by rich at 80 columns as a terminal shows it (the real
search in an 80-column tmux pane is tests/test_screen.py)."""

import re

import pandas as pd
from rich.console import Console

from mae_search.report.terminal import print_trials, print_verdict


def trials(params: dict[str, list]) -> pd.DataFrame:
    n = len(next(iter(params.values())))
    return pd.DataFrame({"trial_id": [f"2f5b7_{i:05d}" for i in range(n)], "status": ["completed"] * n,
                         "seed": [0] * n, "epoch": [6] * n, "linear_probe_acc": [0.30 + 0.01 * i for i in range(n)],
                         **{f"param.{k}": v for k, v in params.items()}})


def screen(df: pd.DataFrame, labels: dict[str, str]) -> list[str]:
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115 - closed with the console
    print_trials(console, df, "linear_probe_acc", "max", {f"param.{k}": v for k, v in labels.items()})
    return console.export_text().splitlines()


def test_numbers_never_wrap_and_headers_wrap_between_words():
    df = trials({"optim.blr": [0.0008752, 0.01234], "model.decoder_embed_dim": [32, 128]})
    lines = screen(df, {"optim.blr": "blr", "model.decoder_embed_dim": "decoder embed dim"})
    assert all(len(line) <= 80 for line in lines)
    boxed = [line for line in lines if line[:1] in "┏┃┡│└"]
    assert len(boxed) >= 6 and all(line.rstrip()[-1] in "┓┃┩│┘" for line in boxed)  # not cropped on the right
    body = "\n".join(lines)
    # Every searched value whole, with the report's four significant digits, on its trial's line.
    first = next(line for line in lines if "2f5b7_00000" in line)
    assert all(v in first for v in ("0.0008752", "32", "30.0"))
    second = next(line for line in lines if "2f5b7_00001" in line)
    assert all(v in second for v in ("0.01234", "128", "31.0"))
    # Header words are whole ("decoder" never split as "decod" / "er"), one per line where they must.
    assert re.search(r"\bdecod\b", body) is None and "searched values" not in body
    assert any("decoder" in line for line in lines) and any(re.search(r"\bdim\b", line) for line in lines)


def test_many_searched_parameters_follow_the_table_as_items():
    params = {"masking.mask_ratio": [0.7548, 0.7918], "masking.start_fraction": [0.5619, 0.7262],
              "model.decoder_depth": [2, 3], "model.decoder_embed_dim": [32, 128],
              "loss.freq_weight": [0.003306, 0.1632], "loss.unif_weight": [0.04066, 0.0001369],
              "optim.blr": [0.01537, 0.01302]}
    lines = screen(trials(params), {k: k.rsplit(".", 1)[-1].replace("_", " ") for k in params})
    assert all(len(line) <= 80 for line in lines)
    text = " ".join(lines)
    for i, trial in enumerate(("2f5b7_00000", "2f5b7_00001")):
        start = text.index(f"{trial}:")
        items = text[start:].split(":", 1)[1].split()[:7]
        assert items == [f"{k.rsplit('.', 1)[-1]}={v[i]}" for k, v in params.items()]


def test_the_verdict_never_splits_a_margin():
    text = ("**Verdict** (test split): 1 of 2 finished settings beat the random-init encoder and raw pixels on "
            "LP top-1 (points, paired by seed): 0.75 +12.0 ± 1.0 (n=5) over random-init encoder, +14.1 ± 0.9 "
            "(n=5) over raw pixels.")
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    print_verdict(console, text)
    lines = console.export_text().splitlines()
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines)
    joined = "\n".join(lines)
    assert "+12.0 ± 1.0 (n=5)" in joined and "+14.1 ± 0.9 (n=5)" in joined and lines[0].startswith("Verdict (test")
