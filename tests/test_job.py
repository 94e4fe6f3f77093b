"""Jobs: the shipped jobs load, flags override fields, bad jobs give one-line errors; the typed tables
(pctune.schema), the stage settings, the sampler table and finding jobs by name."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from pctune import PctuneError
from pctune.cli import _parser, main
from pctune.evaluate.settings import (
    ATTACKS,
    STAGE_SETTINGS,
    AdversarialSettings,
    AttackSpec,
    ExplainSettings,
    ImagenetCSettings,
    NoiseSettings,
    default_attacks,
    parse_stage_settings,
)
from pctune.schema import read_table
from pctune.search.cli import job_overrides
from pctune.search.job import (
    REPO_ROOT,
    job_from_mapping,
    load_job,
    parse_assignment,
    resolve_job_path,
    resolve_space_path,
)
from pctune.search.locate import shipped
from pctune.search.samplers import SAMPLERS, make_sampler

MINIMAL = {"model": {"name": "demo"}, "data": {"source": "digits"}, "search": {"space": "demo"}}


@pytest.mark.parametrize("name", ["demo", "pvgg16", "peffnetb0", "demo-explain-sweep"])
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
    monkeypatch.chdir(tmp_path)  # no ./jobs here: pctune's own (package data)
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


def test_promote_flags_override_the_job_as_search_flags_do(tmp_path):
    args = _parser().parse_args(["promote", "demo", "--stages", "noise", "--top-k", "2", "--storage-path",
                                 str(tmp_path), "--tracking-uri", "file:/tmp/ml", "--set", "promotion.noise.sigmas=[0.5]"])
    overrides = job_overrides(args)
    assert overrides == {"run.storage_path": str(tmp_path), "tracking.tracking_uri": "file:/tmp/ml",
                         "promotion.noise.sigmas": [0.5]}
    job = load_job("demo", overrides)
    assert job.run_dir == tmp_path.resolve() / "demo" and job.tracking.tracking_uri == "file:/tmp/ml"
    assert job.promotion.settings["noise"].sigmas == [0.5]


def test_parse_assignment_reads_toml_values():
    assert parse_assignment("a.b=3") == ("a.b", 3)
    assert parse_assignment("a=[1, 2]") == ("a", [1, 2])
    assert parse_assignment("a=cmaes") == ("a", "cmaes")


@pytest.mark.parametrize(("change", "message"), [
    ({"search": {"space": "demo", "sampler": "bayes"}},
     r"^j.toml: search.sampler: unknown sampler 'bayes' \(tpe, tpe-mf, cmaes, gp, random, nsga2\)$"),
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
    assert err == [f"pctune: error: {job}: search.sampler: unknown sampler 'x' (tpe, tpe-mf, cmaes, gp, random, nsga2)"]


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


# -- finding jobs and search spaces ------------------------------------------------------------------
def test_a_job_in_the_current_directory_comes_before_the_shipped_one(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "demo.toml").write_text(
        (shipped("jobs") / "demo.toml").read_text().replace("num_samples = 40", "num_samples = 3"))
    (tmp_path / "jobs" / "mine.toml").write_text('[model]\nname = "demo"\n[data]\nsource = "digits"\n'
                                                 '[search]\nspace = "demo"\n')
    assert resolve_job_path("demo") == Path("jobs") / "demo.toml"
    job = load_job("demo")
    assert job.search.num_samples == 3
    assert job.space_path.resolve() == (shipped("search_spaces") / "demo.toml").resolve()  # no ./search_spaces
    assert load_job("mine").name == "mine"
    assert load_job("pvgg16").source == str(shipped("jobs") / "pvgg16.toml")  # not in ./jobs: the shipped one
    with pytest.raises(PctuneError, match=r"^unknown job 'nosuch'; known jobs: demo, mine \(in ./jobs\); "
                                          r"demo, demo-explain-sweep, demo-robust, peffnetb0, pvgg16, pvgg16-robust \(shipped with pctune\)$"):
        load_job("nosuch")


def test_a_job_path_is_never_a_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PctuneError, match=r"^jobs/demo.toml: no such job file$"):
        load_job("jobs/demo.toml")  # an explicit path: not looked up in the shipped jobs
    with pytest.raises(PctuneError, match=r"^demo.toml: no such job file$"):
        load_job("demo.toml")


def test_a_space_next_to_the_jobs_folder_comes_first(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    (project / "search_spaces").mkdir()
    (project / "search_spaces" / "demo.toml").write_text("[default]\nbeta = 0.5\n")
    job = project / "jobs" / "j.toml"
    job.write_text('[model]\nname = "demo"\n[data]\nsource = "digits"\n[search]\nspace = "demo"\n')
    assert load_job(job).space_path == project / "search_spaces" / "demo.toml"
    (project / "jobs" / "space.toml").write_text("[default]\nbeta = 0.5\n")
    assert resolve_space_path("space.toml", job) == project / "jobs" / "space.toml"  # a path: next to the job


def test_the_checkout_links_to_the_shipped_folders():
    for folder in ("jobs", "search_spaces"):
        link = REPO_ROOT / folder
        assert link.is_symlink() and link.readlink() == Path("pctune") / folder
        assert link.resolve() == shipped(folder).resolve()
        expected = {"jobs": ["demo-explain-sweep.toml", "demo-robust.toml", "demo.toml", "peffnetb0.toml",
                             "pvgg16-robust.toml", "pvgg16.toml"],
                    "search_spaces": ["demo-sweep.toml", "demo.toml", "peffnetb0.toml", "pvgg16.toml"]}[folder]
        assert sorted(p.name for p in shipped(folder).glob("*.toml")) == expected


# -- promotion settings --------------------------------------------------------------------------------
def _job_file(tmp_path, promotion: str) -> Path:
    path = tmp_path / "j.toml"
    path.write_text('[model]\nname = "demo"\n[data]\nsource = "digits"\n[search]\nspace = "demo"\n' + promotion)
    return path


@pytest.mark.parametrize(("stage", "key"), [("noise", "sigmass"), ("imagenet-c", "severity"),
                                            ("adversarial", "attack")])
def test_a_misspelled_stage_setting_names_file_table_and_key(tmp_path, stage, key):
    path = _job_file(tmp_path, f"[promotion.{stage}]\n{key} = 1\n")
    known = ", ".join(sorted(f.name for f in dataclasses.fields(STAGE_SETTINGS[stage])))
    with pytest.raises(PctuneError) as info:
        load_job(path)
    assert str(info.value) == f"{path}: [promotion.{stage}]: unknown key {key!r} (known: {known})"


def test_an_unknown_key_in_an_attack_names_file_table_index_and_key(tmp_path):
    path = _job_file(tmp_path, '[promotion.adversarial]\nattacks = [\n  { name = "bim", epsilons = [0.1], steps = 5 },\n'
                               '  { name = "pgd", epsilon = [0.5], steps = 5 },\n]\n')
    with pytest.raises(PctuneError) as info:
        load_job(path)
    assert str(info.value) == (f"{path}: promotion.adversarial.attacks[2]: unknown key 'epsilon' "
                               "(known: epsilons, max_images, modes, name, rel_stepsize, steps)")


@pytest.mark.parametrize(("promotion", "message"), [
    ("[promotion.noise]\nsigmas = [0.5, -1]", r"^j.toml: promotion.noise.sigmas\[2\]: must be >= 0, got -1.0$"),
    ("[promotion.noise]\nsigmas = 0.5", r"^j.toml: promotion.noise.sigmas: expected a list, got 0.5$"),
    ("[promotion.noise]\ntimesteps = 0", r"^j.toml: promotion.noise.timesteps: must be >= 1, got 0$"),
    ("[promotion.noise]\nnum_images = 0", r"^j.toml: promotion.noise.num_images: must be >= 1, got 0$"),
    ("[promotion.imagenet-c]\nsource = \"released\"", r"^j.toml: promotion.imagenet-c.path: the released ImageNet-C "
                                                       r"folder is required"),
    ("[promotion.imagenet-c]\nsource = \"web\"", r"^j.toml: promotion.imagenet-c.source: unknown source 'web' "
                                                  r"\(generated, released\)$"),
    ("[promotion.imagenet-c]\nseverities = [1, 6]", r"^j.toml: promotion.imagenet-c.severities\[2\]: must be in 1..5"),
    ("[promotion.imagenet-c]\nuse_ray = 1", r"^j.toml: promotion.imagenet-c.use_ray: expected true or false, got 1$"),
    ("[promotion.adversarial]\nchunk = 0", r"^j.toml: promotion.adversarial.chunk: must be >= 1, got 0$"),
    ("[promotion.adversarial]\nattacks = [{ name = \"fgsm\", epsilons = [1], steps = 2 }]",
     r"^j.toml: promotion.adversarial.attacks\[1\]: unknown attack 'fgsm' \(known: bim, pgd, hsj\)$"),
    ("[promotion.adversarial]\nattacks = [{ name = \"bim\", epsilons = [\"a\"], steps = 2 }]",
     r"^j.toml: promotion.adversarial.attacks\[1\].epsilons\[1\]: expected a number, got 'a'$"),
    ("[promotion.adversarial]\nattacks = [{ name = \"bim\", steps = 2 }]",
     r"^j.toml: promotion.adversarial.attacks\[1\].epsilons: missing$"),
    ("[promotion.adversarial]\nattacks = [\"bim\"]", r"^j.toml: promotion.adversarial.attacks\[1\]: expected a table"),
    ("[promotion]\nstages = [\"noise\", \"mnist-c\"]", r"^j.toml: promotion.stages: unknown stage 'mnist-c' "
                                                         r"\(known: imagenet-c, adversarial, noise, explain\)$"),
    ("[promotion]\nsettings = {}", r"^j.toml: \[promotion\]: unknown key 'settings'"),
])
def test_bad_stage_settings_give_one_line_errors(tmp_path, monkeypatch, promotion, message):
    monkeypatch.chdir(tmp_path)
    _job_file(tmp_path, promotion + "\n")
    with pytest.raises(PctuneError, match=message) as info:
        load_job("j.toml")
    assert "\n" not in str(info.value)


def test_stage_settings_come_from_the_dataclasses(tmp_path):
    job = load_job(_job_file(tmp_path, "[promotion.noise]\n"))
    assert job.promotion.settings == {"imagenet-c": ImagenetCSettings(), "adversarial": AdversarialSettings(),
                                      "noise": NoiseSettings(), "explain": ExplainSettings()}
    assert NoiseSettings() == NoiseSettings(10, [0.0, 0.25, 0.5, 0.75, 1.0], 0, None)
    assert AdversarialSettings().attacks is None and AdversarialSettings().num_images == 1000
    assert ImagenetCSettings().source == "generated" and ImagenetCSettings().severities == [1, 2, 3, 4, 5]
    assert load_job(_job_file(tmp_path, "")).promotion.settings == job.promotion.settings


def test_the_demo_job_reads_its_stage_settings():
    settings = load_job(REPO_ROOT / "jobs" / "demo.toml").promotion.settings
    assert settings["noise"] == NoiseSettings(timesteps=10, num_images=250)
    assert [a.name for a in settings["adversarial"].attacks] == ["bim", "pgd", "hsj"]
    assert settings["adversarial"].attacks[0] == AttackSpec("bim", [0.02, 0.05, 0.1], steps=20)
    assert settings["adversarial"].attacks[2].modes == ["decision"]
    assert settings["imagenet-c"] == ImagenetCSettings(timesteps=10, num_images=200)


def test_parse_stage_settings_checks_types_and_ranges():
    assert parse_stage_settings("noise", {"sigmas": [0, 1]}, "--set").sigmas == [0.0, 1.0]  # ints accepted
    assert parse_stage_settings("imagenet-c", {"source": "released", "path": "/c"}, "--set").path == "/c"
    with pytest.raises(PctuneError, match=r"^--set: \[noise\]: unknown key 'sigma' \(known: "):
        parse_stage_settings("noise", {"sigma": 1}, "--set", name="noise")
    with pytest.raises(PctuneError,
                       match=r"^--set: unknown stage 'mnist-c' \(known: imagenet-c, adversarial, noise, explain\)$"):
        parse_stage_settings("mnist-c", {}, "--set")


def test_the_stage_table_drives_the_job_and_the_command_line():
    assert tuple(STAGE_SETTINGS) == ("imagenet-c", "adversarial", "noise", "explain")
    args = _parser().parse_args(["evaluate", "noise", "--model", "demo", "--hparams", "default", "--data", "digits",
                                 "--out", "x"])
    assert args.stage == "noise"
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["evaluate", "mnist-c", "--model", "demo", "--hparams", "default", "--data", "digits",
                              "--out", "x"])
    assert info.value.code == 2


def test_attacks_live_in_the_settings_and_are_imported_back():
    from pctune.evaluate import adversarial

    assert adversarial.AttackSpec is AttackSpec and adversarial.default_attacks is default_attacks
    assert set(ATTACKS) == {"bim", "pgd", "hsj"} == {a.name for a in default_attacks()}
    with pytest.raises(PctuneError, match=r"^unknown attack 'fgsm' \(known: bim, pgd, hsj\)$"):
        AttackSpec("fgsm", [1.0], steps=1)


def test_settings_and_samplers_import_neither_torch_nor_optuna():
    import subprocess
    import sys

    import pctune

    # `import pctune` itself imports torch: stand in an empty package to see what these modules import
    code = (f"import sys, types; pkg = types.ModuleType('pctune'); pkg.__path__ = [{str(Path(pctune.__file__).parent)!r}]; "
            "sys.modules['pctune'] = pkg; import pctune.evaluate.settings, pctune.search.samplers, pctune.schema; "
            "sys.exit(sorted({'torch', 'optuna'} & set(sys.modules)) or None)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- samplers ---------------------------------------------------------------------------------------
def test_the_sampler_table_drives_the_flag_and_the_job(capsys):
    assert list(SAMPLERS) == ["tpe", "tpe-mf", "cmaes", "gp", "random", "nsga2"]
    for name in SAMPLERS:
        assert _parser().parse_args(["search", "demo", "--sampler", name]).sampler == name
    with pytest.raises(SystemExit) as info:
        main(["search", "demo", "--sampler", "nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(name in err.split("choose from")[1] for name in SAMPLERS)


def test_make_sampler_makes_every_sampler_in_the_table():
    import optuna

    from pctune.search.mf_tpe import FidelityTPESampler

    kinds = {"tpe": optuna.samplers.TPESampler, "tpe-mf": FidelityTPESampler, "cmaes": optuna.samplers.CmaEsSampler,
             "gp": optuna.samplers.GPSampler, "random": optuna.samplers.RandomSampler, "nsga2": optuna.samplers.NSGAIISampler}
    for name in SAMPLERS:
        assert isinstance(make_sampler(name, seed=0, concurrent=1), kinds[name])
    for name in ("tpe", "tpe-mf"):
        assert make_sampler(name, 0, 4)._constant_liar and not make_sampler(name, 0, 1)._constant_liar
    with pytest.raises(PctuneError, match=r"^j.toml: search.sampler: unknown sampler 'bayes' \(tpe, tpe-mf, cmaes, gp, random, nsga2\)$"):
        make_sampler("bayes", 0, 1, "j.toml")


# -- the schema -------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Inner:
    size: int = 1


@dataclasses.dataclass
class _Table:
    name: str
    ratio: float = 0.5
    flags: list[bool] = dataclasses.field(default_factory=list)
    label: str | None = None
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    extra: dict[str, int] = dataclasses.field(default_factory=dict)


def test_read_table_checks_keys_and_types():
    t = read_table(_Table, {"name": "a", "ratio": 1, "label": "", "inner": {"size": 3}, "extra": {"k": 2}}, "f.toml", "t")
    assert t == _Table("a", 1.0, [], None, _Inner(3), {"k": 2}) and isinstance(t.ratio, float)
    assert read_table(_Table, {"name": "a"}, "f.toml", "t") == _Table("a")
    for table, message in [
        ({}, r"^f.toml: t.name: missing$"),
        ({"name": "a", "ratio": "x"}, r"^f.toml: t.ratio: expected a number, got 'x'$"),
        ({"name": "a", "ratio": True}, r"^f.toml: t.ratio: expected a number, got True$"),
        ({"name": "a", "flags": [True, 1]}, r"^f.toml: t.flags\[2\]: expected true or false, got 1$"),
        ({"name": "a", "label": 3}, r"^f.toml: t.label: expected a string, got 3$"),
        ({"name": "a", "inner": {"sise": 3}}, r"^f.toml: \[t.inner\]: unknown key 'sise' \(known: size\)$"),
        ({"name": "a", "inner": 3}, r"^f.toml: t.inner: expected a table, got 3$"),
        ({"name": "a", "extra": {"k": 1.5}}, r"^f.toml: t.extra.k: expected an integer, got 1.5$"),
        ({"name": "a", "nmae": "b"}, r"^f.toml: \[t\]: unknown key 'nmae' \(known: extra, flags, inner, label, name, "
                                     r"ratio\)$"),
    ]:
        with pytest.raises(PctuneError, match=message):
            read_table(_Table, table, "f.toml", "t")
