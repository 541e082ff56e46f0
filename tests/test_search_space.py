from pathlib import Path

import pytest

from mae_search.config import ConfigError
from mae_search.search.cluster import plan_concurrency
from mae_search.search.space import load_search_space
from mae_search.search.strategy import param_space

SPACES = sorted((Path(__file__).parent.parent / "search_spaces").glob("*.yaml"))

VALID = """
name: t
base: {epochs: 3}
dimensions:
  masking.mask_ratio: {grid: [0.5, 0.75]}
metric: val_linear_probe_acc
mode: max
"""


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_every_shipped_space_loads_and_has_a_tiny_twin():
    names = {p.stem for p in SPACES}
    assert {"mask_ratio", "curriculum_start", "decoder", "loss_weights", "improvements", "joint"} <= names
    for path in SPACES:
        space = load_search_space(path)
        assert space.total_trials() >= 1
        if not path.stem.endswith("_tiny"):
            assert path.stem + "_tiny" in names


def test_valid_space_round_trip(tmp_path):
    space = load_search_space(write(tmp_path, VALID))
    assert space.is_grid and space.total_trials() == 2
    assert space.trial_config({"masking.mask_ratio": 0.5}, seed=3).masking.mask_ratio == 0.5


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("metric: val_linear_probe_acc", "metric: val_linear_probe_acc\ncolour: blue"), "colour: unknown key"),
        (("masking.mask_ratio: {grid: [0.5, 0.75]}", "masking.mask_ration: {grid: [0.5]}"),
         "dimensions.masking.mask_ration: unknown parameter"),
        (("{grid: [0.5, 0.75]}", "{grid: [0.5, 1.5]}"), "dimensions.masking.mask_ratio: value 1.5 is invalid"),
        (("{grid: [0.5, 0.75]}", "{uniform: [0.9, 0.5]}"), "must have low < high"),
        (("{grid: [0.5, 0.75]}", "{loguniform: [0.0, 0.5]}"), "must be positive"),
        (("{grid: [0.5, 0.75]}", "{uniform: [0.5, 0.9], grid: [0.5]}"), "exactly one of"),
        (("{grid: [0.5, 0.75]}", "{uniform: [a, b]}"), "dimensions.masking.mask_ratio.uniform.0"),
        (("metric: val_linear_probe_acc", "metric: accuracy"), "unknown metric 'accuracy'"),
        (("base: {epochs: 3}", "base: {epochs: -1}"), "epochs: Input should be greater than or equal to 1"),
        (("mode: max", "mode: maximise"), "mode: Input should be 'max' or 'min'"),
        (("name: t", "name: t\nscheduler: {type: asha, max_epochs: 9}"), "max_epochs 9 exceeds base epochs 3"),
    ],
)
def test_bad_spaces_give_one_line_errors_naming_file_and_key(tmp_path, change, expected):
    path = write(tmp_path, VALID.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_search_space(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message and "\n" not in message


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_search_space(write(tmp_path, "name: [unclosed"))
    with pytest.raises(ConfigError, match="not found"):
        load_search_space(tmp_path / "absent.yaml")


def test_variants_expand_to_their_settings(tmp_path):
    space = load_search_space(Path(__file__).parent.parent / "search_spaces" / "improvements_tiny.yaml")
    cfg = space.trial_config({"variant": "improved"}, seed=0)
    assert cfg.masking.curriculum and cfg.loss.freq_weight == 0.05 and cfg.loss.unif_weight == 0.01
    assert space.trial_config({"variant": "original"}, seed=0).loss.freq_weight == 0.0
    bad = VALID.replace("masking.mask_ratio: {grid: [0.5, 0.75]}", "v: {variants: {a: {loss.nope: 1}}}")
    with pytest.raises(ConfigError, match=r"dimensions.v.a: .*unknown parameter 'loss.nope'"):
        load_search_space(write(tmp_path, bad))


def test_seeds_multiply_grid_and_param_space(tmp_path):
    space = load_search_space(write(tmp_path, VALID + "seeds: [0, 1, 2]\n"))
    assert space.total_trials() == 6
    assert param_space(space)["seed"] == {"grid_search": [0, 1, 2]}
    optuna = VALID.replace("{grid: [0.5, 0.75]}", "{uniform: [0.5, 0.9]}") + "seeds: [0, 1]\n"
    with pytest.raises(ConfigError, match="several seeds per configuration only with seeds_per_trial: 2"):
        load_search_space(write(tmp_path, optuna))


def test_asha_needs_an_evaluation_at_every_rung(tmp_path):
    """ASHA compares the metric at epochs grace x factor^k: evaluating every 2 epochs serves grace 2 (rungs
    2, 4, ...), not grace 1 or 3, nor a factor of 1.5 (rung 3)."""
    text = VALID.replace("base: {epochs: 3}", "base: {epochs: 8, eval: {every_epochs: 2}}")
    with pytest.raises(ConfigError, match="every_epochs 2 must divide scheduler.grace_period 1"):
        load_search_space(write(tmp_path, text))
    for scheduler in ("{grace_period: 3}", "{grace_period: 2, reduction_factor: 1.5}"):
        with pytest.raises(ConfigError, match="each of which must be evaluated"):
            load_search_space(write(tmp_path, text + f"scheduler: {scheduler}\n"))
    space = load_search_space(write(tmp_path, text + "scheduler: {grace_period: 2, reduction_factor: 2}\n"))
    assert space.base.eval.every_epochs == 2


def test_overrides_apply_to_base(tmp_path):
    space = load_search_space(write(tmp_path, VALID), overrides={"data.num_train": 256})
    assert space.base.data.num_train == 256
    with pytest.raises(ConfigError, match="unknown parameter 'data.nope'"):
        load_search_space(write(tmp_path, VALID), overrides={"data.nope": 1})


def test_concurrency_respects_cluster(tmp_path):
    space = load_search_space(write(tmp_path, VALID + "max_concurrent_trials: 8\n"))
    assert plan_concurrency(space, {"CPU": 2}).concurrency == 2
    assert plan_concurrency(space, {"CPU": 16}).concurrency == 8
    gpu_res = "resources: {workers: 2, cpus_per_worker: 2, gpus_per_worker: 1}\n"
    gpu = load_search_space(write(tmp_path, VALID + gpu_res))
    assert plan_concurrency(gpu, {"CPU": 16, "GPU": 4}).concurrency == 2
    with pytest.raises(ConfigError, match="needs 4 CPU and 2 GPU"):
        plan_concurrency(gpu, {"CPU": 16, "GPU": 1})


def test_searchers_follow_the_file(tmp_path):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from mae_search.search.strategy import make_sampler, make_scheduler, make_searcher, optuna_storage_url

    grid = load_search_space(write(tmp_path, VALID))
    assert make_searcher(grid, tmp_path / "grid") is None  # a grid runs every value, no search algorithm
    two = VALID.replace("{grid: [0.5, 0.75]}", "{uniform: [0.5, 0.9]}").replace(
        "metric: val_linear_probe_acc\nmode: max\n",
        "objectives: [{metric: val_linear_probe_acc, mode: max}, {metric: pretrain_time_s, mode: min}]\n"
        "scheduler: {type: none}\nsampler: nsga2\n")
    space = load_search_space(write(tmp_path, two))
    searcher = make_searcher(space, tmp_path / "search")
    assert isinstance(searcher, OptunaSearch) and isinstance(make_sampler(space), optuna.samplers.NSGAIISampler)
    searcher.set_search_properties(None, None, param_space(space))
    config = searcher.suggest("trial-1")
    assert 0.5 <= config["masking.mask_ratio"] <= 0.9
    # The study is persisted under the search's name, with both directions, as optuna-dashboard would open it.
    study = optuna.load_study(study_name="t", storage=optuna_storage_url(tmp_path / "search"))
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert [t.params["masking.mask_ratio"] for t in study.trials] == [config["masking.mask_ratio"]]
    assert make_scheduler(space, 3, tmp_path) is None
    with pytest.raises(ConfigError, match="ASHA needs a single metric"):
        load_search_space(write(tmp_path, two.replace("scheduler: {type: none}\n", "")))


def test_startup_trials_lets_tpe_guide_a_small_search_earlier(tmp_path):
    """TPE samples its first trials at random (Optuna's default: 10, so a search of 10 trials or fewer is a
    random search); startup_trials sets how many. It is refused where no sampler has such trials."""
    import optuna

    from mae_search.search.strategy import make_sampler

    sampled = VALID.replace("{grid: [0.5, 0.75]}", "{uniform: [0.5, 0.9]}")

    def first_ratios(text: str, n: int = 6) -> list[float]:
        study = optuna.create_study(sampler=make_sampler(load_search_space(write(tmp_path, text))),
                                    direction="maximize")
        study.optimize(lambda t: -(t.suggest_float("masking.mask_ratio", 0.5, 0.9) - 0.8) ** 2, n_trials=n)
        return [t.params["masking.mask_ratio"] for t in study.trials]

    random = first_ratios(sampled + "sampler: random\n")
    assert first_ratios(sampled) == random  # TPE's default start-up: 6 trials, all random
    guided = first_ratios(sampled + "startup_trials: 3\n")
    assert guided[:3] == random[:3] and guided[3:] != random[3:]
    for text, what in ((VALID + "startup_trials: 3\n", "a grid"), (sampled + "sampler: random\nstartup_trials: 3\n",
                                                                   "random")):
        with pytest.raises(ConfigError, match=rf"startup_trials: only for the tpe, gp, cmaes samplers .*is {what}\)"):
            load_search_space(write(tmp_path, text))


def test_finetuning_objective_needs_finetuning_when_it_is_read(tmp_path):
    """val_finetune_acc can be the objective; a space that never computes it, or ASHA reading it at rungs
    where it is not computed, is refused in one line before Ray starts."""
    grid = VALID.replace("metric: val_linear_probe_acc", "metric: val_finetune_acc") + "scheduler: {type: none}\n"
    assert load_search_space(write(tmp_path, grid)).primary.metric == "val_finetune_acc"
    never = grid.replace("base: {epochs: 3}", "base: {epochs: 3, eval: {finetune: {at: never}}}")
    with pytest.raises(ConfigError, match=r"base.eval.finetune.at is 'never' but the objective 'val_finetune_acc'"):
        load_search_space(write(tmp_path, never))
    asha = VALID.replace("metric: val_linear_probe_acc", "metric: val_partial_finetune_acc") + \
        "scheduler: {type: asha}\n"
    asha = asha.replace("{grid: [0.5, 0.75]}", "{uniform: [0.5, 0.9]}")
    with pytest.raises(ConfigError, match=r"partial_finetune.at is 'never' .* needs every_eval"):
        load_search_space(write(tmp_path, asha))
    ok = asha.replace("base: {epochs: 3}", "base: {epochs: 3, eval: {partial_finetune: {at: every_eval}}}")
    assert load_search_space(write(tmp_path, ok)).primary.metric == "val_partial_finetune_acc"


def test_embedding_width_without_sincos_is_refused_before_ray(tmp_path):
    bad = VALID.replace("masking.mask_ratio: {grid: [0.5, 0.75]}", "model.embed_dim: {grid: [96, 102]}")
    bad = bad.replace("base: {epochs: 3}", "base: {epochs: 3, model: {num_heads: 2}}")
    with pytest.raises(ConfigError, match=r"dimensions.model.embed_dim: value 102 is invalid .*not divisible by 4"):
        load_search_space(write(tmp_path, bad))


def test_model_presets_in_space_files_with_overrides_and_as_a_dimension(tmp_path):
    preset = VALID.replace("base: {epochs: 3}", "base: {epochs: 3, model: {preset: vit-b16, decoder_depth: 4}}")
    model = load_search_space(write(tmp_path, preset)).base.model
    assert (model.embed_dim, model.depth, model.decoder_embed_dim, model.decoder_depth) == (768, 12, 512, 4)
    grid = VALID.replace("masking.mask_ratio: {grid: [0.5, 0.75]}", "model.preset: {grid: [tiny, small]}")
    space = load_search_space(write(tmp_path, grid))
    assert space.trial_config({"model.preset": "small"}, seed=0).model.embed_dim == 192
    assert space.trial_config({"model.preset": "tiny"}, seed=0).model.embed_dim == 96
    unknown = VALID.replace("base: {epochs: 3}", "base: {epochs: 3, model: {preset: vit-q7}}")
    with pytest.raises(ConfigError, match=r"space.yaml: base.model: unknown model preset 'vit-q7' \(known: tiny,"):
        load_search_space(write(tmp_path, unknown))
    bad_dim = VALID.replace("masking.mask_ratio: {grid: [0.5, 0.75]}", "model.preset: {grid: [tiny, vit-q7]}")
    with pytest.raises(ConfigError, match=r"dimensions.model.preset: value 'vit-q7' is invalid"):
        load_search_space(write(tmp_path, bad_dim))


def test_resume_refuses_a_changed_configuration_or_a_smaller_cluster(tmp_path):
    from mae_search.search.cluster import ClusterPlan
    from mae_search.search.resume import check_resumable

    space = load_search_space(write(tmp_path, VALID))
    exp_dir = tmp_path / "results" / "t"
    exp_dir.mkdir(parents=True)
    (exp_dir / "search_space.json").write_text(space.model_dump_json())
    (exp_dir / "plan.json").write_text('{"concurrency": 2}')
    assert check_resumable(space, exp_dir, ClusterPlan(concurrency=2, cpus=2, gpus=0)) is None  # the same search
    bigger = check_resumable(space, exp_dir, ClusterPlan(concurrency=4, cpus=4, gpus=0))
    assert bigger == ("resuming with 2 concurrent trial(s) as recorded; this cluster could hold 4 "
                      "(a new search would use them)")
    changed = load_search_space(write(tmp_path, VALID), overrides={"epochs": 5})  # e.g. a --set dropped or added
    with pytest.raises(ConfigError, match=r"differ at base.epochs \(recorded 3, now 5\)") as exc:
        check_resumable(changed, exp_dir, ClusterPlan(concurrency=2, cpus=2, gpus=0))
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"runs 2 trials at once, but this cluster holds 1 \(1 CPU, 0 GPU\)"):
        check_resumable(space, exp_dir, ClusterPlan(concurrency=1, cpus=1, gpus=0))


@pytest.mark.parametrize("experiment", ["../../../x", "/tmp/elsewhere", "a/b", "x" * 101])
def test_experiment_name_cannot_leave_the_storage_directory(tmp_path, experiment):
    text = VALID + f"experiment: '{experiment}'\n"
    with pytest.raises(ConfigError, match=r"space.yaml: experiment: String should"):
        load_search_space(write(tmp_path, text))


def test_yaml_problems_are_one_line_with_their_position(tmp_path):
    with pytest.raises(ConfigError, match=r"space.yaml: not valid YAML at line 3, column 1 \(duplicate key 'base'\)"):
        load_search_space(write(tmp_path, "name: t\nbase: {}\nbase: {epochs: 2}\n"))
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3, column 1 \(expected ',' or '\]'"):
        load_search_space(write(tmp_path, "name: t\nseeds: [1\n"))
    with pytest.raises(ConfigError, match=r"could not determine a constructor for the tag .*python/object/apply"):
        load_search_space(write(tmp_path, "name: !!python/object/apply:os.system [id]\n"))
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: t\ndescription: café crème\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text at line 2, column 17 \(byte 0xe9\)"):
        load_search_space(path)
    path.write_bytes("name: t\ndescription: café crème\n".encode().replace(b"cr\xc3\xa8me", b"cr\xe8me"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text at line 2, column 21 \(byte 0xe8\)"):
        load_search_space(path)  # columns count characters: the é before it is one
    with pytest.raises(ConfigError, match=r"not valid YAML at line 2, column 7 \(character #x0000 is not allowed"):
        load_search_space(write(tmp_path, "name: t\nseeds:\x00 [1]\n"))


def test_bad_set_values_are_one_line_errors_before_ray(tmp_path):
    from tests.conftest import cli

    for value, expected in (("epochs=[1", "--set 'epochs=[1': not valid YAML at line 1"),
                            ("epochs=!!python/object/apply:os.system [id]", "could not determine a constructor")):
        out = cli("search", "--storage", str(tmp_path / "r"), "--set", value, check=False)
        assert out.returncode == 2 and expected in out.stdout and "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "r").exists()
    # A data path that does not exist fails in seconds, before Ray starts, naming the key and the path.
    out = cli("search", "search_spaces/mask_ratio.yaml", "--storage", str(tmp_path / "r"),
              "--set", f"data.path={tmp_path / 'stl10_binary'}", check=False)
    assert out.returncode == 2 and "data.path (stl10): data path" in out.stdout and "does not exist" in out.stdout
    assert "Ray:" not in out.stdout and not (tmp_path / "r").exists()


def test_selection_reads_the_validation_split_unless_the_file_says_test(tmp_path):
    """A test metric as the objective is refused with the validation name to use; select_on: test allows it
    (and then scores the test split at every evaluation, so ASHA can read it at every rung)."""
    on_test = VALID.replace("metric: val_linear_probe_acc", "metric: linear_probe_acc")
    with pytest.raises(ConfigError, match=r"objective 'linear_probe_acc' is measured on the test split; select on "
                                          r"'val_linear_probe_acc' \(the validation split\), or say select_on: test"):
        load_search_space(write(tmp_path, on_test))
    space = load_search_space(write(tmp_path, on_test + "select_on: test\n"))
    assert space.select_on == "test" and space.base.eval.test_at == "every_eval"
    assert load_search_space(write(tmp_path, VALID)).base.eval.test_at == "end"
    with pytest.raises(ConfigError, match=r"select_on: test, but objective 'val_linear_probe_acc'"):
        load_search_space(write(tmp_path, VALID + "select_on: test\n"))


def test_a_space_without_dimensions_says_it_runs_the_base_configuration(tmp_path):
    from mae_search.search.run import plan_sentence

    bare = load_search_space(write(tmp_path, "name: t\nbase: {epochs: 3}\ndimensions: {}\nseeds: [0, 1, 2]\n"
                                              "metric: val_linear_probe_acc\nmode: max\n"))
    assert plan_sentence(bare) == ("3 trials (grid, scheduler asha) of the base configuration "
                                   "(the space has no dimensions)")
    one = load_search_space(write(tmp_path, VALID.replace("[0.5, 0.75]", "[0.5]")))
    assert plan_sentence(one) == "1 trial (grid, scheduler asha)"


def test_optuna_is_told_the_evaluated_epochs_only():
    """Between evaluations (eval.every_epochs > 1) an epoch reports no metric: Ray's OptunaSearch fails on
    it (KeyError in the driver); the project's passes Optuna the evaluated epochs."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from mae_search.search.strategy import EvaluatedEpochsOptuna

    def searcher(cls):
        s = cls(space={"x": tune.uniform(0, 1)}, metric="val_linear_probe_acc", mode="max",
                sampler=optuna.samplers.RandomSampler(seed=0))
        s.suggest("t1")
        return s

    with pytest.raises(KeyError):
        searcher(OptunaSearch).on_trial_result("t1", {"training_iteration": 1, "loss": 0.9})
    ours = searcher(EvaluatedEpochsOptuna)
    ours.on_trial_result("t1", {"training_iteration": 1, "loss": 0.9})
    ours.on_trial_result("t1", {"training_iteration": 2, "loss": 0.8, "val_linear_probe_acc": 0.31})
    trial = ours._ot_trials["t1"]
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {2: 0.31}
