"""Multi-fidelity search (ASHA, HyperBand over images seen) and the timestep-0 cache, on a real local
Ray with real Optuna and MLflow (no mocks)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import kill_after_trials, write_job
from mlflow import MlflowClient

from pctune.cli import main
from pctune.errors import PctuneError
from pctune.search.job import load_job
from pctune.search.results import leaderboard
from pctune.search.rundir import RunDir, read_early_stops
from pctune.search.schedulers import FidelityASHA, FidelityOptunaSearch, grace_images, report_points

ASHA = 'scheduler = "asha"\ngrace_images = 12\nreduction_factor = 3'


def test_report_points_are_the_rungs_then_every_image():
    assert report_points(500, "fifo", None, 3) == [500]
    assert report_points(500, "asha", None, 3) == [19, 57, 171, 500]  # grace = ceil(500 / 27)
    assert report_points(200, "asha", 12, 3) == [12, 36, 108, 200]
    assert report_points(100, "hyperband", 40, 2) == [40, 80, 100]
    assert grace_images(10, 50, 3) == 10


@pytest.mark.parametrize(("line", "message"), [
    ('scheduler = "bohb"', "search.scheduler: unknown scheduler 'bohb' (fifo, asha, hyperband)"),
    ("reduction_factor = 1", "search.reduction_factor: must be > 1"),
    ("grace_images = 0", "search.grace_images: must be >= 1"),
    ("cache_gb = -1", "search.cache_gb: must be >= 0"),
])
def test_bad_scheduler_settings_are_named(workdir, line, message):
    with pytest.raises(PctuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_job(write_job(workdir, "bad-scheduler", search_extra=line))


@pytest.fixture(scope="module")
def asha_run(cluster, workdir, tmp_path_factory):
    """One tracked ASHA search: 16 trials on 200 images, rungs at 12, 36 and 108 images."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('asha-mlflow')}/mlflow.db"
    path = write_job(workdir, "asha", num_samples=16, concurrent=2, images=200, points='["default"]',
                     search_extra=ASHA)
    assert main(["search", str(path), "--address", cluster, "--tracking-uri", uri]) == 0
    return load_job(path), uri


@pytest.mark.slow
def test_asha_stops_trials_early_and_none_of_them_wins(asha_run):
    job, uri = asha_run
    run_dir = RunDir(job.run_dir)
    trials = run_dir.trials("joint")
    assert len(trials) == 16 and all(t.finished for t in trials)
    stopped = [t for t in trials if t.stopped_early]
    full = [t for t in trials if not t.stopped_early]
    assert stopped and full, "ASHA stopped no trial (or every trial)"
    assert set(read_early_stops(job.run_dir / "joint")) == {t.trial_id for t in stopped}
    for t in stopped:
        assert t.metrics["num_images"] < 200 and t.metrics["final"] == 0
        assert [images for images, _ in t.curve] == [12, 36, 108][:len(t.curve)]
    for t in full:
        assert t.metrics["num_images"] == 200 or t.metrics["diverged"]
    # the ranking, the leaderboard, best.toml and the MLflow champion: full-fidelity configurations only
    ranked = run_dir.ranking()
    assert ranked and all(e.full_fidelity for e in ranked)
    assert not {e.trial_id for e in ranked} & {t.trial_id for t in stopped}
    frame = leaderboard(job)
    assert frame[frame["stopped_early"]]["rank"].isna().all()
    assert (job.run_dir / "best.toml").read_text().count(f"mean_ce = {ranked[0].mean_ce:.6g}") == 1
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias(job.name, "champion")
    assert client.get_run(version.run_id).data.tags["pctune.champion_trial"] == ranked[0].trial_id


@pytest.mark.slow
def test_mlflow_children_log_the_curve_and_the_early_stop(asha_run):
    job, uri = asha_run
    client = MlflowClient(uri)
    trials = {t.trial_id: t for t in RunDir(job.run_dir).trials("joint")}
    runs = client.search_runs([client.get_experiment_by_name(job.tracking.experiment or job.name).experiment_id],
                              filter_string="tags.`pctune.trial_id` != ''")
    assert len(runs) == 16
    for run in runs:
        trial = trials[run.data.tags["pctune.trial_id"]]
        assert run.data.tags["pctune.stopped_early"] == ("true" if trial.stopped_early else "false")
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "mean_ce"))
        assert [step for step, _ in history] == [images for images, _ in trial.curve]
        assert [value for _, value in history] == pytest.approx([value for _, value in trial.curve])
        assert run.data.metrics["num_images"] == trial.metrics["num_images"]
        assert run.data.metrics["total_images"] == 200


@pytest.mark.slow
def test_pruned_trials_reach_the_optuna_study_as_pruned(asha_run):
    import optuna

    job, _ = asha_run
    trials = RunDir(job.run_dir).trials("joint")
    searcher = FidelityOptunaSearch()
    searcher.restore_from_dir(str(job.run_dir / "joint"))
    study = searcher._ot_study.get_trials(deepcopy=False)
    pruned = [t for t in study if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study if t.state == optuna.trial.TrialState.COMPLETE]
    stopped = [t for t in trials if t.stopped_early]
    assert len(pruned) == len(stopped) and len(complete) == 16 - len(stopped)
    # each with the running mean it was stopped at, at step = images seen
    assert sorted(t.value for t in pruned) == pytest.approx(sorted(t.metrics["mean_ce"] for t in stopped))
    assert sorted(t.last_step for t in pruned) == sorted(int(t.metrics["num_images"]) for t in stopped)
    assert sorted(t.value for t in complete) == pytest.approx(
        sorted(t.metrics["mean_ce"] for t in trials if not t.stopped_early))


@pytest.mark.slow
def test_asha_rebuilds_its_rungs_from_the_finished_trials(asha_run):
    job, _ = asha_run
    trials = RunDir(job.run_dir).trials("joint")
    scheduler = FidelityASHA(job.run_dir / "joint", 200, 12, 3)
    assert scheduler.seed_rungs() == 16
    sizes = scheduler.rung_sizes()
    for milestone in (12, 36, 108):
        assert sizes[milestone] == sum(1 for t in trials if any(images >= milestone for images, _ in t.curve))


def test_the_scheduler_and_the_progress_lines_log_where_told_and_pickle_with_their_default(tmp_path):
    """Tune pickles its callbacks and scheduler into tuner.pkl and restores them on --resume."""
    import pickle
    from types import SimpleNamespace

    from pctune.search.callbacks import Progress
    from pctune.utils import print_line

    lines = []
    Progress("joint", 2, log=lines.append).on_trial_error(0, [], SimpleNamespace(trial_id="t1", local_path="/x"))
    assert lines == ["[joint] trial t1 failed (see /x)"]
    for made in (Progress("joint", 2), FidelityASHA(tmp_path / "joint", 200, 12, 3)):
        restored = pickle.loads(pickle.dumps(made))
        assert restored.log is print_line
        del restored.log  # as restored from a state pickled before they had a log
        assert restored.log is print_line


@pytest.mark.slow
def test_resume_after_sigkill_under_asha_loses_no_finished_trial(cluster, workdir, capsys):
    path = write_job(workdir, "asha-resume", num_samples=10, images=300, timesteps=4, points='["default"]',
                     search_extra=ASHA)
    job = load_job(path)
    run_dir = RunDir(job.run_dir)
    driver = subprocess.Popen([sys.executable, "-m", "pctune.cli", "search", str(path), "--address", cluster],
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    kill_after_trials(driver, run_dir, 3)
    before = {t.trial_id: t for t in run_dir.trials("joint") if t.finished}
    assert 3 <= len(before) < 10
    # the worst moment to be killed: in the middle of Tune rewriting its state file (what that leaves)
    state = sorted((job.run_dir / "joint").glob("experiment_state-*.json"))[-1]
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    time.sleep(2)  # let Ray notice the dead driver and release its trial actors
    job.resume = True
    from pctune.search.driver import run_search

    capsys.readouterr()
    resumed_at = time.time()
    run_search(job)
    out = capsys.readouterr().out
    assert "restored its last complete copy" in out
    # the rung decisions go on from the rungs of the trials that had finished, rebuilt from their curves
    assert f"[joint] ASHA rungs rebuilt from the {len(before)} trials that had finished" in out
    after = {t.trial_id: t for t in run_dir.trials("joint")}
    assert sum(t.finished for t in after.values()) == 10
    for trial_id, trial in before.items():  # every trial finished before the kill: kept, never run again
        kept = after[trial_id]  # (or, finished after the state was last saved: replayed from its result)
        assert kept.finished and kept.stopped_early == trial.stopped_early
        assert kept.metrics["mean_ce"] == trial.metrics["mean_ce"]
        assert kept.metrics["num_images"] == trial.metrics["num_images"]
        assert kept.metrics["timestamp"] == trial.metrics["timestamp"] or kept.metrics.get("replayed") == 1
    # the missing trials ran after the resume, once each (a trial the kill cut short keeps its folder and
    # its rung reports, unfinished: Tune runs it again under a new id, and no ranking counts it)
    new = [t for key, t in after.items() if key not in before and t.finished]
    assert len(new) == 10 - len(before)
    assert all(t.metrics["timestamp"] >= int(resumed_at) - 1 and not t.metrics.get("replayed") for t in new)
    best = run_dir.best()
    assert best is not None and best.full_fidelity


def test_timestep_zero_cache_gives_identical_scores_and_falls_back_when_over_budget():
    import pctune
    from pctune.search.objective import score_chunks
    from pctune.search.t0cache import TimestepZeroCache

    torch.manual_seed(0)
    net = pctune.create_model("demo")
    x, y = torch.randn(90, 1, 16, 16), torch.randint(0, 10, (90,))

    def run(hparams, starts=None):
        results = list(score_chunks(net, x, y, hparams, timesteps=3, batch_size=32, report_at=[20, 60],
                                    starts=starts))
        return [{k: v for k, v in r.items() if k != "eval_seconds"} for r in results]

    cache, counter = TimestepZeroCache(), {"cached": 0}
    for preset in ("default", "feedforward", {"beta": 0.4, "lambda": 0.3, "alpha": 0.2}):
        hp = net.hyperparameters(preset)
        plain = run(hp)
        assert run(hp, cache.starts(net, ("demo",), 1.0, counter)) == plain  # filled (or read) here
        assert run(hp, cache.starts(net, ("demo",), 1.0, counter)) == plain  # read here
    assert counter["cached"] == 5 * 90  # every run after the very first one read every batch
    tiny, counter = TimestepZeroCache(), {"cached": 0}
    hp = net.hyperparameters("default")
    assert run(hp, tiny.starts(net, ("demo",), 1e-9, counter)) == run(hp)
    assert run(hp, tiny.starts(net, ("demo",), 1e-9, counter)) == run(hp)
    assert tiny.entries == {} and counter["cached"] == 0  # over budget: recomputed, no error


@pytest.mark.slow
def test_a_search_reuses_timestep_zero_across_trials(asha_run):
    job, _ = asha_run
    trials = RunDir(job.run_dir).trials("joint")
    assert sum(t.metrics.get("t0_cached", 0) for t in trials) > 0


@pytest.mark.slow
def test_hyperband_search_finishes_and_only_full_fidelity_wins(cluster, workdir):
    """(With the multi-fidelity TPE: its view of the study takes over once 10 trials reached a rung, and
    HyperBand pauses and resumes trials under it.)"""
    path = write_job(workdir, "hyperband", num_samples=12, concurrent=2, images=120, points='["default"]',
                     search_extra='scheduler = "hyperband"\ngrace_images = 10\nreduction_factor = 3')
    assert main(["search", str(path), "--address", cluster, "--sampler", "tpe-mf"]) == 0
    job = load_job(path)
    run_dir = RunDir(job.run_dir)
    trials = run_dir.trials("joint")
    assert len(trials) == 12 and all(t.finished for t in trials)
    assert any(t.stopped_early for t in trials)
    best = run_dir.best()
    assert best is not None and best.full_fidelity and best.metrics["num_images"] == 120
    recorded = json.loads((job.run_dir / "job.json").read_text())["job"]["search"]
    assert (recorded["scheduler"], recorded["sampler"]) == ("hyperband", "tpe-mf")


def test_a_result_file_cut_short_by_a_killed_driver_is_read_from_pctunes_own_record(tmp_path):
    """Tune rewrites a trial's result.json in the run directory in the background (a copy of its staging
    folder); a driver killed during the copy leaves it cut short, or the folder not there at all. The
    stage's record (appended before Tune moves on) then gives the trial's results and config."""
    import json

    from pctune.search.trials import append_result, load_trials

    exp = tmp_path / "joint"
    config = {"pcoder1.beta": 0.5, "pcoder1.lambda": 0.2, "pcoder1.alpha": 0.01}
    rung = {"trial_id": "a", "mean_ce": 1.0, "num_images": 12, "final": 0.0, "training_iteration": 1}
    last = {"trial_id": "a", "mean_ce": 0.8, "num_images": 300, "final": 1.0, "training_iteration": 2}
    folder = exp / "run_trial_a_1_x"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(config))
    (folder / "result.json").write_text(json.dumps(rung) + "\n" + json.dumps(last)[:20])  # cut short mid-line
    for result in (rung, last):
        append_result(exp, folder.name, {**result, "config": config})
    # a trial run twice from the start (a resumed search), and one whose folder never reached the run directory
    other = {"trial_id": "b", "mean_ce": 0.9, "num_images": 300, "final": 1.0, "training_iteration": 1}
    append_result(exp, "run_trial_b_2_x", {**other, "mean_ce": 5.0, "final": 0.0, "config": config})
    append_result(exp, "run_trial_b_2_x", {**other, "config": config})
    trials = {t.trial_id: t for t in load_trials(exp)}
    assert trials["a"].finished and trials["a"].metrics["mean_ce"] == 0.8 and trials["a"].config == config
    assert trials["a"].curve == ((12, 1.0), (300, 0.8))
    assert trials["b"].finished and trials["b"].curve == ((300, 0.9),)
    # a complete result.json is read as before (the record is the fallback, not a second source)
    (folder / "result.json").write_text(json.dumps(rung) + "\n" + json.dumps({**last, "mean_ce": 0.7}) + "\n")
    assert {t.trial_id: t for t in load_trials(exp)}["a"].metrics["mean_ce"] == 0.7
