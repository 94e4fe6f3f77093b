"""Jobs: the shipped jobs load, flags override fields, bad jobs give one-line errors."""

import argparse

import pytest

from pctune import PctuneError
from pctune.cli import _parser, main
from pctune.search.cli import job_overrides
from pctune.search.job import REPO_ROOT, job_from_mapping, load_job, parse_assignment, resolve_space_path

MINIMAL = {"model": {"name": "demo"}, "data": {"source": "digits"}, "search": {"space": "demo"}}


@pytest.mark.parametrize("name", ["demo", "pvgg16", "peffnetb0"])
def test_shipped_jobs_load(name):
    job = load_job(REPO_ROOT / "jobs" / f"{name}.toml")
    assert job.name == name
    assert job.space_path.is_file()
    assert job.objective.sigma == 0.5 and job.objective.timesteps == 4
    assert job.promotion.top_k >= 1


def test_paper_jobs_follow_the_paper():
    pvgg = load_job(REPO_ROOT / "jobs" / "pvgg16.toml")
    assert (pvgg.search.strategy, pvgg.data.num_images, pvgg.search.starting_points) == ("joint", 2000,
                                                                                       ["default", "tuned"])
    eff = load_job(REPO_ROOT / "jobs" / "peffnetb0.toml")
    assert (eff.search.strategy, eff.data.num_images) == ("per-pcoder", 4050)
    assert 0 < pvgg.search.resources["gpu"] < 1  # fractional GPUs


def test_jobs_are_found_by_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not in the repository: falls back to pctune's own jobs/
    assert load_job("demo").source.endswith("jobs/demo.toml")
    with pytest.raises(PctuneError, match="unknown job 'nosuch'; known jobs: .*demo"):
        load_job("nosuch")


def test_command_line_flags_override_the_job():
    args = _parser().parse_args(["search", "demo", "--num-samples", "7", "--address", "auto", "--tracking-uri",
                                 "file:/tmp/ml", "--gpus-per-trial", "0.5", "--set", "objective.sigma=0.75",
                                 "--set", "search.sampler=random"])
    overrides = job_overrides(args)
    job = load_job("demo", overrides)
    assert job.search.num_samples == 7
    assert job.run.address == "auto"
    assert job.tracking.tracking_uri == "file:/tmp/ml"
    assert job.search.resources["gpu"] == 0.5
    assert job.objective.sigma == 0.75
    assert job.search.sampler == "random"


def test_parse_assignment_reads_toml_values():
    assert parse_assignment("a.b=3") == ("a.b", 3)
    assert parse_assignment("a=[1, 2]") == ("a", [1, 2])
    assert parse_assignment("a=cmaes") == ("a", "cmaes")


@pytest.mark.parametrize(("change", "message"), [
    ({"search": {"space": "demo", "sampler": "bayes"}},
     r"^j.toml: search.sampler: unknown sampler 'bayes' \(tpe, cmaes, gp, random\)$"),
    ({"search": {"space": "demo", "strategy": "greedy"}}, r"^j.toml: search.strategy: unknown strategy 'greedy'"),
    ({"search": {"space": "demo", "num_samples": 0}}, r"^j.toml: search.num_samples: must be >= 1, got 0$"),
    ({"search": {"space": "demo", "resources": {"gpu": -1}}}, r"^j.toml: search.resources.gpu: must be >= 0"),
    ({"search": {"space": "demo", "typo": 1}}, r"^j.toml: \[search\]: unknown key 'typo'"),
    ({"objective": {"sigma": "high"}}, r"^j.toml: objective.sigma: expected a number, got 'high'$"),
    ({"objective": {"timesteps": 0}}, r"^j.toml: objective.timesteps: must be >= 1"),
    ({"data": {"source": "imagenet-val"}}, r"^j.toml: data.path: the ImageNet validation folder is required"),
    ({"data": {"source": "cifar"}}, r"^j.toml: data.source: unknown data source 'cifar'"),
    ({"model": {}}, r"^j.toml: model.name: missing$"),
    ({"extra": {}}, r"^j.toml: unknown key 'extra'"),
    ({"promotion": {"top_k": 0}}, r"^j.toml: promotion.top_k: must be >= 1"),
])
def test_bad_jobs_give_one_line_errors(change, message):
    with pytest.raises(PctuneError, match=message) as info:
        job_from_mapping({**MINIMAL, **change}, source="j.toml")
    assert "\n" not in str(info.value)


def test_unknown_space_names_the_job_and_field(tmp_path):
    with pytest.raises(PctuneError, match=r"j.toml: search.space: unknown search space 'nosuch'"):
        resolve_space_path("nosuch", tmp_path / "j.toml")


def test_cli_prints_one_line_errors(tmp_path, capsys):
    job = tmp_path / "bad.toml"
    job.write_text('[model]\nname = "demo"\n[data]\nsource = "digits"\n[search]\nspace = "demo"\nsampler = "x"\n')
    assert main(["search", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pctune: error: {job}: search.sampler: unknown sampler 'x' (tpe, cmaes, gp, random)"]


def test_a_starting_point_outside_the_space_is_a_one_line_cli_error(tmp_path, capsys):
    import torch

    import pctune
    from pctune.models import save_feedback_weights

    net = pctune.create_model("demo")
    torch.save(net.backbone.state_dict(), tmp_path / "backbone.pt")
    save_feedback_weights(net, tmp_path / "feedback.pt")
    job = tmp_path / "j.toml"
    job.write_text(f'[model]\nname = "demo"\nbackbone_weights = "{tmp_path}/backbone.pt"\n'
                   f'feedback_weights = "{tmp_path}/feedback.pt"\n[data]\nsource = "digits"\n'
                   '[search]\nspace = "demo"\nstarting_points = ["feedforward"]\n')
    assert main(["search", str(job), "--storage-path", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].endswith("demo.toml: starting point 'feedforward': pcoder1: alpha = 0 is outside the search "
                           "range [0.0001, 0.5] log")


def test_overrides_namespace_without_search_flags():
    args = argparse.Namespace(set=["search.num_samples=3"], storage_path=None)
    assert job_overrides(args) == {"search.num_samples": 3}
