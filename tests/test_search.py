"""Real searches on a local Ray (no mocks): tiny model, tiny images, a few trials each."""

import json
import tomllib
from pathlib import Path

import pytest
import torch
from helpers import write_job

import pctune
from pctune import Hyperparameters
from pctune.cli import main
from pctune.search.driver import run_search
from pctune.search.job import load_job
from pctune.search.results import leaderboard, load_trials
from pctune.search.rundir import RunDir
from pctune.search.samplers import SAMPLERS
from pctune.search.space import hparams_from_config, load_space


@pytest.fixture(autouse=True)
def _tracking_in_tmp(tmp_path, monkeypatch):
    """`pctune search` also tracks to MLflow: keep its database out of the working directory."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


def _configs(job) -> list[dict]:
    return [t.config for t in load_trials(job.run_dir / "joint")]


@pytest.fixture(scope="module")
def basic(cluster, workdir):
    """One finished search, shared by the tests that read results."""
    job = load_job(write_job(workdir, "basic", num_samples=6))
    return job, run_search(job)


@pytest.mark.slow
def test_a_search_samples_feasible_points_and_evaluates_starting_points_first(basic, workdir):
    job, summary = basic
    trials = load_trials(job.run_dir / "joint")
    assert len(trials) == 6 and all(t.status == "TERMINATED" for t in trials)
    space = load_space(workdir / "space.toml", 3)
    for t in trials:
        hp = hparams_from_config(t.config, 3)
        for ranges, (b, lam, a) in zip(space.pcoders, hp.triples(), strict=True):
            assert b + lam <= 1 + 1e-12
            assert ranges.beta.contains(b) and ranges.lambda_.contains(lam) and ranges.alpha.contains(a)
        metrics = t.metrics
        assert {"mean_ce", "ce_t0", "ce_t2", "accuracy_t0", "accuracy_t2", "recon_error_pc1",
                "recon_error_pc3"} <= set(metrics)
        assert metrics["mean_ce"] == pytest.approx((metrics["ce_t1"] + metrics["ce_t2"]) / 2)
        assert metrics["model_loads"] == 1  # the worker built the model once, not once per trial
    first, second = (hparams_from_config(t.config, 3) for t in trials[:2])
    assert first.triples()[0] == pytest.approx((0.8, 0.1, 0.01))  # "default", enqueued first
    assert second.triples()[1] == pytest.approx((0.5, 0.2, 0.05))  # the inline point, second
    frame = leaderboard(job)
    assert {"feedforward", "default"} <= set(frame.loc[frame["kind"] == "reference", "name"])
    assert summary["trials"] == 6


@pytest.mark.slow
def test_a_diverging_trial_does_not_stop_the_search(cluster, workdir):
    (workdir / "wild.toml").write_text("""
[default]
beta = { low = 0.0, high = 1.0 }
lambda = { low = 0.0, high = 1.0 }
alpha = { low = 1e-3, high = 1e30, log = true }
""")
    job = load_job(write_job(workdir, "diverge", space="wild.toml", num_samples=6, points='["default"]',
                             sampler="random", extra="gradient_scaling = true"))
    run_search(job)
    trials = load_trials(job.run_dir / "joint")
    assert len(trials) == 6 and all(t.status == "TERMINATED" for t in trials)
    diverged = [t.metrics for t in trials if t.metrics["diverged"]]
    assert diverged, "expected some alpha in [1e-3, 1e30] to blow up"
    penalty = json.loads((job.run_dir / "job.json").read_text())["penalty"]
    assert all(m["mean_ce"] == penalty and penalty < 1e3 for m in diverged)
    assert not trials[0].metrics["diverged"]  # the default point is sane
    assert leaderboard(job)["mean_ce"].notna().all()


@pytest.mark.slow
def test_per_pcoder_strategy_combines_the_winners(cluster, workdir):
    from pctune.data.demo import digits
    from pctune.data.noise import add_gaussian_noise
    from pctune.data.subsets import subset_indices
    from pctune.search.objective import score

    job = load_job(write_job(workdir, "perpc", num_samples=2, strategy="per-pcoder", points='["default"]'))
    run_search(job)
    defaults = pctune.create_model("demo").hyperparameters("default").triples()
    winners = []
    for n in (1, 2, 3):
        trials = load_trials(job.run_dir / f"pcoder{n}")
        assert len(trials) == 2 and all(t.status == "TERMINATED" for t in trials)
        triples = [hparams_from_config(t.config, 3).triples() for t in trials]
        for hp in triples:  # the other pcoders stay at the defaults (the top pcoder's lambda is unused: 0)
            for m, triple in enumerate(hp, start=1):
                if m != n:
                    expected = defaults[m - 1] if m < 3 else (defaults[m - 1][0], 0.0, defaults[m - 1][2])
                    assert triple == pytest.approx(expected)
        assert len({hp[n - 1] for hp in triples}) == 2, f"stage pcoder{n} did not search pcoder{n}"
        # the stage's winner, read from its trials: the lowest mean_ce among those that did not diverge
        finished = [(t.metrics["mean_ce"], hp) for t, hp in zip(trials, triples, strict=True)
                    if not t.metrics["diverged"]]
        assert finished
        winners.append(min(finished, key=lambda pair: pair[0])[1][n - 1])
    combo = json.loads((job.run_dir / "combination.json").read_text())
    combined = hparams_from_config(combo["config"], 3)
    assert [v for triple in combined.triples() for v in triple] == pytest.approx(
        [v for triple in winners for v in triple], rel=1e-12)
    # its score is that of a direct evaluation of those hyperparameters on the search's noisy images
    net = pctune.create_model("demo", backbone_weights=workdir / "backbone.pt", feedback_weights=workdir / "feedback.pt")
    images, labels = digits("test", image_size=net.input_size[-1])
    idx = subset_indices(len(labels), job.data.num_images, job.data.seed)
    noise_seed = job.data.seed if job.objective.noise_seed is None else job.objective.noise_seed
    noisy = add_gaussian_noise(images[idx].float(), job.objective.sigma, noise_seed)
    direct = score(net, noisy, labels[idx], combined, timesteps=job.objective.timesteps,
                   batch_size=job.objective.batch_size)
    assert combo["metrics"]["num_images"] == len(idx) == 48
    assert combo["metrics"]["mean_ce"] == pytest.approx(direct["mean_ce"], rel=1e-5)
    assert combo["metrics"]["ce_t0"] == pytest.approx(direct["ce_t0"], rel=1e-5)
    # and the leaderboard shows that combination with that score
    frame = leaderboard(job)
    (row,) = [r for _, r in frame.iterrows() if r["kind"] == "combination"]
    assert row["mean_ce"] == pytest.approx(direct["mean_ce"], rel=1e-5)
    assert {k: row[k] for k in combo["config"]} == pytest.approx(combo["config"], rel=1e-12)


@pytest.mark.slow
def test_results_command_writes_a_leaderboard_and_a_loadable_best_toml(basic, capsys):
    path = Path(basic[0].source)
    assert main(["results", str(path)]) == 0
    out = capsys.readouterr().out
    assert "feedforward" in out and "best configuration" in out
    run_dir = load_job(path).run_dir
    assert (run_dir / "leaderboard.csv").read_text().startswith("rank,kind,name,mean_ce")
    with (run_dir / "best.toml").open("rb") as fh:
        hp = Hyperparameters.from_mapping(tomllib.load(fh))
    net = pctune.create_model("demo")
    assert net.run(torch.zeros(2, 1, 16, 16), 2, hp).shape == (3, 2, 10)
    best = RunDir(run_dir).ranking()[:3]
    assert list(leaderboard(load_job(path))["rank"].dropna().head(3)) == [1, 2, 3]
    assert best[0].mean_ce <= best[1].mean_ce <= best[2].mean_ce
    assert best[0].hparams == hp


@pytest.mark.slow
def test_an_existing_search_is_not_overwritten_silently(basic, capsys):
    path = Path(basic[0].source)
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert "already holds a search of basic: pass --resume to continue it or --overwrite" in err


# -- the objective itself (no Ray) ---------------------------------------------------------------
def _demo_data(n=40):
    from pctune.data.demo import digits
    from pctune.data.noise import add_gaussian_noise

    x, y = digits("test")
    return add_gaussian_noise(x[:n], 0.5, seed=0), y[:n]


def test_objective_feedforward_scores_its_timestep_zero():
    from pctune.search.objective import score

    torch.manual_seed(0)
    net = pctune.create_model("demo")
    x, y = _demo_data()
    m = score(net, x, y, net.hyperparameters("feedforward"), timesteps=3, batch_size=16)
    assert m["mean_ce"] == pytest.approx(m["ce_t0"], rel=1e-5)
    assert m["ce_t1"] == pytest.approx(m["ce_t3"], rel=1e-5) and m["diverged"] == 0
    expected = torch.nn.functional.cross_entropy(net(x), y).item()
    assert m["ce_t0"] == pytest.approx(expected, rel=1e-5)
    assert m["accuracy_t0"] == pytest.approx((net(x).argmax(1) == y).float().mean().item())


def test_objective_does_not_depend_on_the_batch_size():
    from pctune.search.objective import score

    torch.manual_seed(0)
    net = pctune.create_model("demo")
    x, y = _demo_data()
    hp = net.hyperparameters({"beta": 0.5, "lambda": 0.3, "alpha": 0.05})
    a = score(net, x, y, hp, timesteps=2, batch_size=40)
    b = score(net, x, y, hp, timesteps=2, batch_size=7)
    for key in ("mean_ce", "ce_t2", "accuracy_t2", "recon_error_pc2", "recon_error_pc1_t1"):
        assert a[key] == pytest.approx(b[key], rel=1e-4)


@pytest.mark.parametrize("alpha", [1e6, 1e20, 1e37])
def test_objective_reports_divergence_as_a_finite_penalty(alpha):
    from pctune.search.objective import default_penalty, score

    torch.manual_seed(0)
    net = pctune.create_model("demo", gradient_scaling=True)
    x, y = _demo_data()
    m = score(net, x, y, net.hyperparameters({"beta": 0.5, "lambda": 0.2, "alpha": alpha}), timesteps=3)
    assert m["diverged"] == 1 and m["mean_ce"] == default_penalty(10)
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())


def test_noise_is_drawn_once_from_the_seed():
    from pctune.data.noise import add_gaussian_noise

    x = torch.zeros(4, 1, 8, 8)
    a, b, c = add_gaussian_noise(x, 0.5, 1), add_gaussian_noise(x, 0.5, 1), add_gaussian_noise(x, 0.5, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std().item() == pytest.approx(0.5, rel=0.2)


# Every sampler of the table, through the searcher a search uses (Ray Tune's OptunaSearch over pctune's
# space), fed a deterministic score. Model-based samplers draw their first trials at random (TPE and GP:
# 10), so the runs go past that and their model-based suggestions are compared too (NSGA-II's first
# generation, 50, is random: its 12 are seeded draws).
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_samplers_are_selectable_and_seeded(workdir, sampler):
    from pctune.search.driver import make_searcher

    trials = 12
    space = load_space(workdir / "space.toml", 3)

    def suggestions(seed, count):
        job = load_job(write_job(workdir, f"{sampler}_seeded", sampler=sampler, points="[]"), {"search.seed": seed})
        searcher = make_searcher(job, space, [])
        configs = []
        for i in range(count):
            config = searcher.suggest(f"t{i}")
            hp = hparams_from_config(config, 3)
            searcher.on_trial_complete(f"t{i}", {"mean_ce": sum((b - 0.6) ** 2 + a for b, _l, a in hp.triples())})
            configs.append(config)
        return configs

    one = suggestions(3, trials)
    assert len({json.dumps(c, sort_keys=True) for c in one}) == trials  # it samples, not repeats
    assert suggestions(3, trials) == one  # same seed: the same points, in the same order
    other = suggestions(4, 3)
    assert all(a != b for a, b in zip(other, one[:3], strict=True))  # another seed: other points


@pytest.mark.slow
def test_the_same_seed_samples_the_same_points_through_ray_tune(cluster, workdir):
    """End to end: trials that ran on Ray workers, read back from the experiment folders."""
    def search(name):
        job = load_job(write_job(workdir, f"tune_{name}", num_samples=12, points="[]", images=16))
        run_search(job)
        return _configs(job)

    one = search("a")
    assert len(one) == 12 and search("b") == one


@pytest.mark.slow
def test_an_imagenet_style_folder_job_searches_a_fixed_noisy_subset(cluster, workdir):
    """The ImageNet path end to end on a tiny generated ImageFolder and a 3-channel demo network."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        folder = workdir / "val" / f"n0{c}"
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    spec = (Path(pctune.__file__).parent / "models" / "specs" / "demo.toml").read_text()
    spec = spec.replace('name = "demo"', 'name = "demo_rgb"').replace("in_channels = 1, width", "in_channels = 3, width")
    spec = spec.replace("num_classes = 10,", "num_classes = 3,")  # one output per class folder (checked)
    spec = spec.replace("input_size = [1, 16, 16]", "input_size = [3, 16, 16]")
    spec = spec.replace("in_channels = 16, out_channels = 1,", "in_channels = 16, out_channels = 3,")
    (workdir / "demo_rgb.toml").write_text(spec)
    path = workdir / "rgb.toml"
    path.write_text(f"""
[model]
name = "{workdir}/demo_rgb.toml"
[data]
source = "imagenet-val"
path = "{workdir}/val"
num_images = 10
seed = 0
[objective]
timesteps = 2
batch_size = 4
[search]
space = "{workdir}/space.toml"
num_samples = 2
starting_points = []
[run]
storage_path = "{workdir}/runs"
""")
    job = load_job(path)
    run_search(job)
    trials = load_trials(job.run_dir / "joint")
    assert len(trials) == 2 and all(t.metrics["num_images"] == 10 for t in trials)
    frame = leaderboard(job)
    ff = frame[frame["name"] == "feedforward"].iloc[0]
    assert ff["mean_ce"] == pytest.approx(ff["ce_t0"], rel=1e-5)


def test_missing_data_and_weights_are_one_line_errors_before_any_work(tmp_path, capsys):
    assert main(["search", "pvgg16", "--storage-path", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "jobs/pvgg16.toml: data.path: data/imagenet/val: no such directory (pass --data PATH)")
    assert main(["search", "pvgg16", "--storage-path", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "model.feedback_weights: weights/pvgg16: no such file or directory" in capsys.readouterr().err
