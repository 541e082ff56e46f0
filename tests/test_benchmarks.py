"""The benchmark harness: paired timing and the RESULTS.md sections the scripts rewrite."""

import time

import pytest
import torch

from benchmarks import common
from benchmarks.trainer_throughput import ATTENTION_LENGTHS, attention_kernels_cpu, make_trainer, with_mask_tokens
from mae_search.config import ModelConfig
from mae_search.mae.model import Attention


def test_side_by_side_ratio_is_paired_per_round():
    timed = common.side_by_side({"fast": lambda: time.sleep(0.01), "slow": lambda: time.sleep(0.03)}, 4,
                                torch.device("cpu"), warmup=1, rounds=6)
    assert all(len(t) == 6 for t in timed.times.values())
    ratio, q1, q3 = timed.ratio("fast", "slow")
    assert 2.0 < q1 <= ratio <= q3 < 3.5
    assert 100 < timed.images_per_s("fast") < 400  # 4 images per ~10 ms step


def test_write_section_replaces_only_its_own_block(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "RESULTS.md")
    common.write_section("a", "first A")
    common.write_section("b", "only B")
    common.write_section("a", "second A")
    text = common.RESULTS.read_text()
    assert "second A" in text and "first A" not in text and "only B" in text
    assert text.index("<!-- a:begin -->") < text.index("<!-- b:begin -->")


def test_benchmark_variants_train_and_override_the_attention_kernel():
    cfg = ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    forced = make_trainer(cfg, 4, "cpu", cpu_sdpa_min_tokens=0)
    assert {m.cpu_sdpa_min_tokens for m in forced.model.modules() if isinstance(m, Attention)} == {0}
    symmetric = make_trainer(with_mask_tokens(cfg), 4, "cpu")
    seen = []
    symmetric.model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    before = [p.detach().clone() for p in symmetric.model.parameters()]
    symmetric.train_step(torch.randn(4, 3, 16, 16), 0.75, measure=True, update=True)
    assert seen == [1 + 16]  # all tokens through the encoder
    assert any(not torch.equal(a, p) for a, p in zip(before, symmetric.model.parameters(), strict=True))


def test_attention_kernel_table_has_a_row_per_geometry():
    lines = attention_kernels_cpu(rounds=2, tokens_per_batch=512)
    assert lines[0].count("tokens") == len(ATTENTION_LENGTHS)
    for row in lines[2:]:
        speeds = [float(cell) for cell in row.strip("|").split("|")[1:]]
        assert len(speeds) == len(ATTENTION_LENGTHS) and all(s > 0 for s in speeds)


def test_gpu_benchmark_path_runs_with_a_small_model_on_cpu():
    """The --gpu code path (FLOP counting, per-variant table, ratios), exercised on CPU with the tiny preset."""
    from benchmarks.trainer_throughput import run_gpu

    text = run_gpu(4, 2, device="cpu", preset="tiny", with_compile=False)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| run")}
    assert len(rows) == 3
    gflop = {label.split(":")[0].split(" (")[0]: float(cells[2]) for label, cells in rows.items()}
    ours, symmetric = gflop["mae_search"], gflop["symmetric design"]
    assert 0 < ours < symmetric  # the encoder on all tokens costs more FLOPs per image
    assert all(float(cells[0]) > 0 for cells in rows.values())
    assert "asymmetric vs symmetric encoder" in text


def test_prepared_data_benchmark_measures_both_input_paths(tmp_path):
    from benchmarks.prepared_data import decode_throughput, input_bound, measure, prepare_in_process, write_folder

    folder = write_folder(tmp_path / "folder", 128, val=20)
    assert len(list((folder / "train").rglob("*.jpg"))) == 128
    prepared = prepare_in_process(folder, tmp_path / "prepared", 32, shard_size=50)
    assert len(list((prepared / "train").glob("shard-*.parquet"))) == 3
    assert decode_throughput(prepared, 32, steps=2) > 0
    in_memory_s, streamed_s = input_bound(folder, prepared, 32)
    assert in_memory_s > 0 and streamed_s > 0
    # A whole trial in a fresh process; its final probe streams every labelled image but the validation
    # split's (the first shard: 50 images hold the 26 = 20% of 128 asked for).
    trial = measure("prepared", prepared, 32, repeats=1)
    assert trial["rss_mb"] > 100 and trial["eval_train_images"] == 128 - 50
    # The sampler saw the decode workers: their unique pages, and the tree's PSS beyond zero.
    assert trial["worker_uss_mb"] > 1 and trial["pss_mb"] > 100


def test_gpu_search_check_shares_one_gpu_between_two_trials_then_gives_one_all_of_it():
    """The GPU session's search spaces are valid, and the cluster plan runs the half-GPU trials two at a
    time on one GPU, the whole-GPU trial alone."""
    from benchmarks.gpu_checks import search_space
    from mae_search.search.cluster import plan_concurrency
    from mae_search.search.space import SearchSpace

    one_gpu = {"CPU": 16.0, "GPU": 1.0}
    shared = SearchSpace.model_validate(search_space("gpu-shared", [0.6, 0.75], 0.5, concurrent=2, cpus=4))
    whole = SearchSpace.model_validate(search_space("gpu-whole", [0.75], 1.0, concurrent=2, cpus=4))
    assert plan_concurrency(shared, one_gpu).concurrency == 2
    assert plan_concurrency(whole, one_gpu).concurrency == 1


def test_stream_check_compares_each_worker_count_with_the_step(tmp_path):
    """The streamed-feed table (exercised on CPU with the tiny model): a row per decode-worker count, and
    'input-bound' exactly where the loader delivers fewer images/s than the step consumes."""
    from benchmarks.gpu_checks import stream_check

    text = stream_check(torch.device("cpu"), "tiny", images=320, batch=32, workers=[0, 1])
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "decode" not in line]
    assert [int(r[0]) for r in rows] == [0, 1]
    for _, delivered, ratio, bound in rows:
        assert float(delivered) > 0
        assert bound.strip() == ("yes" if float(ratio) < 1 else "no")


def test_phase_clock_takes_nested_phases_out_of_the_outer_one():
    """A phase's time excludes the phases it calls, so the shares of a trial add up to its wall time."""
    from benchmarks.trial_breakdown import PhaseClock

    ticks = iter([0.0, 1.0, 4.0, 4.5, 6.0, 10.0])  # outer starts, inner 1-4, inner again 4.5-6, outer ends
    clock = PhaseClock(now=lambda: next(ticks))
    inner = clock.wrap("probe", lambda: None)

    def outer() -> str:
        inner()
        inner()
        return "done"

    assert clock.wrap("evaluate", outer)() == "done"
    assert dict(clock.seconds) == {"probe": 4.5, "evaluate": 5.5}


def test_search_efficiency_table_compares_each_variant_with_random_search_over_its_repeats():
    import pandas as pd

    from benchmarks.search_efficiency import efficiency_table, outcome

    def final(vals, tests, times, stopped=0):
        return pd.DataFrame({"val_linear_probe_acc": vals, "linear_probe_acc": tests, "trial_time_s": times,
                             "status": ["stopped_early"] * stopped + ["completed"] * (len(vals) - stopped)})

    runs = {
        "random search": [outcome(100.0, final([0.30, 0.35], [0.31, 0.33], [40.0, 60.0])),
                          outcome(120.0, final([0.40, 0.20], [0.38, 0.22], [50.0, 50.0]))],
        "TPE + ASHA": [outcome(50.0, final([0.42, 0.10], [0.41, 0.12], [40.0, 10.0], stopped=1)),
                       outcome(60.0, final([0.25, 0.44], [0.20, 0.43], [20.0, 30.0], stopped=1))],
    }
    rows = efficiency_table(runs)[2:]
    # Best val of each repeat (35, 40 and 42, 44): the mean ± sample std; the test probe of the trial picked.
    assert rows[0] == "| random search | 37.5 ± 3.5 | 35.5 ± 3.5 | 1.00 | 1.00 | 0 |"
    assert rows[1] == "| TPE + ASHA | 43.0 ± 1.4 | 42.0 ± 1.4 | 0.50 | 0.50 | 2 |"


def test_trial_breakdown_keeps_the_rows_of_earlier_runs_it_does_not_rewrite(tmp_path, monkeypatch):
    import benchmarks.common as common
    from benchmarks.trial_breakdown import earlier_rows

    results = tmp_path / "RESULTS.md"
    results.write_text("<!-- trial-breakdown:begin -->\n| trial | wall (s) |\n|---|---|\n| quickstart | 115 |\n"
                       "| tiny | 224 |\n| quickstart after | 99 |\n<!-- trial-breakdown:end -->\n")
    monkeypatch.setattr(common, "RESULTS", results)
    assert earlier_rows({"quickstart after"}) == ["| quickstart | 115 |", "| tiny | 224 |"]
    assert earlier_rows({"tiny", "quickstart"}) == ["| quickstart after | 99 |"]


def test_finetune_fidelity_accepts_a_recipe_within_the_seed_spread_and_refuses_one_outside_it(monkeypatch):
    from benchmarks import finetune_fidelity as fid

    # today: 5 encoders x 3 fine-tuning seeds, each encoder's seeds at -1 / 0 / +1 around its mean: spread 1.0
    means = [42.6, 45.1, 43.6, 43.8, 40.7]
    today = [[m - 1, m, m + 1] for m in means]
    close = [[m + d - 0.5, m + d, m + d + 0.5] for m, d in zip(means, (0.2, -0.1, 0.05, 0.15, 0.1), strict=True)]
    cheap = [[m + d - 1, m + d, m + d + 1] for m, d in zip(means, (-8.1, -6.6, -3.8, -0.6, -0.7), strict=True)]
    faithful, off = fid.compare(today, close), fid.compare(today, cheap)
    assert faithful.spread == pytest.approx(1.0) and off.spread == pytest.approx(1.0)
    assert faithful.deltas == pytest.approx([0.2, -0.1, 0.05, 0.15, 0.1])
    assert faithful.mean == pytest.approx(0.08) and faithful.faithful
    assert faithful.spearman == pytest.approx(1.0)
    assert off.mean == pytest.approx(-3.96) and not off.faithful
    assert off.spearman == pytest.approx(0.0)  # the ranking of the encoders is lost, too
    # a small bias whose interval still reaches past the spread is not faithful either
    noisy = [[m + d - 1, m + d, m + d + 1] for m, d in zip(means, (0.9, -0.8, 1.2, -0.6, 0.3), strict=True)]
    assert not fid.compare(today, noisy).faithful

    monkeypatch.setattr(fid, "flop_lines", lambda: ["FLOPs line"])
    monkeypatch.setattr(fid, "CANDIDATES", {"near": {}, "cheap": {}})
    table = fid.render({fid.TODAY: today, "near": close, "cheap": cheap}, {fid.TODAY: 96.0, "near": 50.0,
                                                                           "cheap": 32.0}, 1800.0)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "seed spread 1.0" in rows[fid.TODAY]
    assert rows["near"].endswith("| +0.1 ± 0.1 | +1.00 | 50 (0.52x) | yes |")
    assert rows["cheap"].endswith("| -4.0 ± 4.2 | +0.00 | 32 (0.33x) | **no** |")
    assert "FLOPs line" in table
