"""Explainability in the search: the single-pcoder grid sweep (Optuna's GridSampler through Ray Tune)
and the Grad-CAM IoU as the objective (maximized). A real search on a local Ray with a random-weight
demo model (no mocks), and the one-line errors of the combinations that do not go together."""

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import demo_files

from pctune import Hyperparameters, PctuneError
from pctune.evaluate.settings import parse_stage_settings
from pctune.evaluate.stages import run_stage, stage_images
from pctune.search.driver import run_search
from pctune.search.grid import GridSpec, make_grid_searcher, pcoder_grids
from pctune.search.job import job_from_mapping, load_job
from pctune.search.results import leaderboard
from pctune.search.rundir import RunDir
from pctune.search.space import load_space, space_from_mapping

#: the demo CNN with two pcoders (a search runs one Tune experiment per pcoder: two keep the test short)
SPEC = """
name = "demo2"
backbone = "pctune/demo_cnn"
backbone_kwargs = { num_classes = 10, in_channels = 1, width = 16 }
input_size = [1, 16, 16]
gradient_scaling = true
[hyperparameters.default]
beta = 0.8
lambda = 0.1
alpha = 0.01
[[pcoders]]
module = "features.4"
decoder = [{ type = "Upsample", scale_factor = [2.0, 2.0], mode = "bilinear" },
           { type = "ConvTranspose2d", in_channels = 32, out_channels = 1, kernel_size = 3, stride = 1, padding = 1 }]
[[pcoders]]
module = "features.7"
decoder = [{ type = "Upsample", scale_factor = [2.0, 2.0], mode = "bilinear" },
           { type = "ConvTranspose2d", in_channels = 64, out_channels = 32, kernel_size = 3, stride = 1, padding = 1 },
           { type = "ReLU" }]
"""
SPACE = "[default]\nbeta = { low = 0.0, high = 1.0 }\nlambda = { low = 0.0, high = 1.0 }\nalpha = 0.01\n"
GRID = "{ beta = [0.5, 1.0], lambda = [0.0, 0.5] }"
#: the feasible (beta, lambda) points of GRID: (1.0, 0.5) breaks beta + lambda <= 1; the top pcoder: lambda = 0
EXPECTED = {1: {(0.5, 0.0), (1.0, 0.0), (0.5, 0.5)}, 2: {(0.5, 0.0), (1.0, 0.0)}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Random weights for the two-pcoder demo CNN (no training: the search only needs a network)."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "demo2.toml").write_text(SPEC)
    return demo_files(root, root / "demo2.toml", SPACE)


def sweep_job(root: Path, name: str, *, objective: str = 'kind = "cam_iou"', search: str = "") -> Path:
    path = root / f"{name}.toml"
    path.write_text(f"""
[model]
name = "{root}/demo2.toml"
backbone_weights = "{root}/backbone.pt"
feedback_weights = "{root}/feedback.pt"
[data]
source = "digits"
num_images = 24
seed = 1
[objective]
sigma = 0.0
timesteps = 2
batch_size = 24
{objective}
[search]
strategy = "single-pcoder-grid"
space = "space.toml"
grid = {GRID}
max_concurrent_trials = 1
seed = 3
{search}
[run]
storage_path = "{root}/runs"
""")
    return path


@pytest.fixture(scope="module")
def sweep(cluster, model):
    """One sweep, read by the tests below (one trial at a time keeps it short: the shipped demo's two at a
    time covered each of its 35 points exactly once too)."""
    job = load_job(sweep_job(model, "sweep"))
    return job, run_search(job, log=lambda _m: None)


@pytest.mark.slow
def test_the_sweep_runs_every_grid_point_once_with_the_other_pcoders_feedforward(sweep):
    job, summary = sweep
    run_dir = RunDir(job.run_dir)
    assert run_dir.stages() == ["pcoder1", "pcoder2"] and not (job.run_dir / "combination.json").exists()
    for n, expected in EXPECTED.items():
        trials = run_dir.trials(f"pcoder{n}")
        assert all(t.finished for t in trials)
        triples = [Hyperparameters.from_params(t.config).triples() for t in trials]
        assert Counter((b, lam) for b, lam, _ in (hp[n - 1] for hp in triples)) == Counter(expected)  # once each
        assert all(hp[n - 1][2] == 0.01 for hp in triples)  # alpha: the space's fixed value
        assert all(hp[m] == (1.0, 0.0, 0.0) for hp in triples for m in range(2) if m != n - 1)  # feedforward
    assert summary["trials"] == sum(len(v) for v in EXPECTED.values())


@pytest.mark.slow
def test_a_cam_iou_search_maximizes_the_iou_and_best_toml_is_its_best(sweep):
    job, summary = sweep
    run_dir = RunDir(job.run_dir)
    assert run_dir.goal() == ("cam_iou", "max")
    frame = leaderboard(job)
    trials = frame[frame["kind"] == "trial"]
    ranked = frame[frame["rank"].notna()].sort_values("rank")
    assert ranked.iloc[0]["cam_iou"] == trials["cam_iou"].max() > trials["cam_iou"].min()
    assert list(ranked["cam_iou"]) == sorted(ranked["cam_iou"], reverse=True)
    best = run_dir.best()
    assert best.key == ranked.iloc[0]["trial_id"] and summary["best"] == pytest.approx(best.score("cam_iou"))
    assert Hyperparameters.from_mapping(_toml(job.run_dir / "best.toml")) == best.hparams
    for _, row in frame.iterrows():  # the leaderboard gives IoU(T) / IoU(0) per grid point
        assert row["cam_iou_rel"] == pytest.approx(row["cam_iou"] / row["cam_iou_t0"])
    feedforward = frame[frame["name"] == "feedforward"].iloc[0]
    assert feedforward["cam_iou"] == feedforward["cam_iou_t0"] and "mean_ce" in frame
    sweep_csv = (job.run_dir / "sweep.csv").read_text().splitlines()
    assert len(sweep_csv) == 1 + len(trials) and (job.run_dir / "sweep.png").is_file()


@pytest.mark.slow
def test_the_objective_is_the_explain_stages_iou(sweep):
    """sigma = 0: the search's images are the explain stage's clean images, so its IoU at t = 0 and T
    is the stage's, computed the stage's way (its own loading, masks and payload)."""
    job, _ = sweep
    best = RunDir(job.run_dir).best()
    net = job_net(job)
    settings = parse_stage_settings("explain", {"timesteps": 2, "sigmas": [0.0], "num_images": 24, "seed": 1,
                                                "use_ray": False, "resamples": 10, "overlays": 0}, "--set")
    images = stage_images("explain", settings, "digits", None, net)
    table = run_stage(settings, net, best.hparams, images, job.run_dir / "explain-check", log=lambda _m: None).table
    iou = dict(zip(table.timestep, table.iou, strict=True))
    assert best.metrics["cam_iou_t0"] == pytest.approx(iou[0], rel=1e-6)
    assert best.metrics["cam_iou"] == pytest.approx(iou[2], rel=1e-6)


def job_net(job):
    from pctune.search.prepare import load_job_model

    return load_job_model(job, log=lambda _m: None)[1]


def _toml(path: Path) -> dict:
    import tomllib

    with path.open("rb") as fh:
        return tomllib.load(fh)


# -- the grid and its searcher, without Ray ------------------------------------------------------------
def test_the_grid_skips_points_that_break_beta_plus_lambda_at_most_1():
    space = space_from_mapping({"default": {"alpha": 0.01}}, 3)
    grids = pcoder_grids(space, GridSpec(points=3), "j.toml: search.grid")  # 0, 0.5, 1 on both axes
    assert [len(g.points) for g in grids] == [6, 6, 3] and [g.skipped for g in grids] == [3, 3, 0]
    assert "6 grid points: beta {0, 0.5, 1} x lambda {0, 0.5, 1}, alpha 0.01 (3 skipped" in grids[0].describe()
    with pytest.raises(PctuneError, match=r"^j.toml: search.grid: pcoder1: the sweep holds alpha fixed, but .* "
                                          r"gives it the range \[0, 0.1\]"):
        pcoder_grids(space_from_mapping({"default": {"alpha": {"low": 0.0, "high": 0.1}}}, 3), GridSpec(), "j.toml: search.grid")
    with pytest.raises(PctuneError, match=r"^j.toml: search.grid: pcoder2: beta: 0.2 is outside the search space's "
                                          r"range \[0.5, 1\]$"):
        pcoder_grids(space_from_mapping({"default": {"alpha": 0.01}, "pcoder2": {"beta": {"low": 0.5, "high": 1.0}}}, 3),
                     GridSpec(beta=(0.2, 0.6)), "j.toml: search.grid")


def test_the_shipped_sweep_is_a_5_by_5_grid_on_the_iou():
    job = load_job("demo-explain-sweep")
    grids = pcoder_grids(load_space(job.space_path, 3), job.search.grid, "x")
    assert [len(g.points) for g in grids] == [15, 15, 5] and job.objective.goal() == ("cam_iou", "max")
    assert {hp.triples()[0][2] for hp in grids[0].points} == {0.01}


def test_the_grid_searcher_suggests_every_point_exactly_once(model):
    job = load_job(sweep_job(model, "searcher"))
    grid = pcoder_grids(space_from_mapping({"default": {"alpha": 0.01}}, 3), GridSpec(points=4), "x")[0]
    searcher = make_grid_searcher(job, grid)
    seen = []
    for i in range(len(grid.points)):
        config = searcher.suggest(f"t{i}")
        seen.append((config["pcoder1.beta"], config["pcoder1.lambda"]))
        searcher.on_trial_complete(f"t{i}", {"cam_iou": 0.1 * i, "num_images": 24})
    assert len(grid.points) == len(set(seen)) == 10  # 4 x 4, less the 6 with beta + lambda > 1
    assert sorted(seen) == sorted(hp.triples()[0][:2] for hp in grid.points)


# -- combinations that do not go together: one line naming the file and the key ---------------------------
BASE = {"model": {"name": "demo"}, "data": {"source": "digits"}, "search": {"space": "demo"}}
CAM = {**BASE, "objective": {"kind": "cam_iou"}}
GRID_SEARCH = {"space": "demo-sweep", "strategy": "single-pcoder-grid"}


@pytest.mark.parametrize(("job", "message"), [
    ({**CAM, "search": {"space": "demo", "scheduler": "asha"}},
     "search.scheduler: objective.kind = 'cam_iou' needs 'fifo'"),
    ({**CAM, "objective": {"kind": "cam_iou", "conditions": [{"name": "noise"}]}},
     "objective.conditions: objective.kind = 'cam_iou' scores one condition"),
    ({**CAM, "data": {"source": "imagenet-val", "path": "/data/val"}},
     "promotion.explain.masks: objective.kind = 'cam_iou' on an image folder needs the ImageNet-S mask folder"),
    ({**BASE, "objective": {"kind": "iou"}}, r"objective.kind: unknown kind 'iou' \(cross_entropy, cam_iou\)"),
    ({**CAM, "objective": {"kind": "cam_iou", "cam_timesteps": "all"}},
     "objective.cam_timesteps: must be one of last, mean, got 'all'"),
    ({**BASE, "search": {**GRID_SEARCH, "num_samples": 10}},
     r"search.num_samples: strategy = 'single-pcoder-grid' decides it \(one trial per grid point\)"),
    ({**BASE, "search": {**GRID_SEARCH, "sampler": "tpe"}}, "search.sampler: strategy = 'single-pcoder-grid' decides it"),
    ({**BASE, "search": {**GRID_SEARCH, "scheduler": "asha"}},
     "search.scheduler: strategy = 'single-pcoder-grid' scores every grid point on every image: use 'fifo'"),
    ({**BASE, "search": {"space": "demo", "grid": {"points": 3}}},
     "search.grid: only with strategy = 'single-pcoder-grid'"),
    ({**BASE, "search": {**GRID_SEARCH, "grid": {"beta": [0.5, 1.5]}}},
     r"search.grid.beta\[2\]: must be a number in \[0, 1\], got 1.5"),
    ({**BASE, "search": {**GRID_SEARCH, "grid": {"points": 0}}}, "search.grid.points: must be an integer >= 1, got 0"),
    ({**BASE, "search": {**GRID_SEARCH, "grid": {"step": 0.1}}}, "search.grid: unknown key 'step'"),
])
def test_combinations_that_do_not_go_together_are_one_line_errors(job, message):
    with pytest.raises(PctuneError, match=rf"^j.toml: {message}") as info:
        job_from_mapping(json.loads(json.dumps(job)), source="j.toml")
    assert "\n" not in str(info.value)
