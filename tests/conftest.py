import pytest
import torch
from helpers import demo_files

import pctune


@pytest.fixture(scope="session", autouse=True)
def isolated_tracking(tmp_path_factory):
    """Searches run by the tests track into a temporary SQLite store, never ./mlflow.db."""
    import os

    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="session", autouse=True)
def shared_demo_cache(tmp_path_factory):
    """One cache of the trained demo model for the whole session (trained on first use, about 10 s),
    never the user's ~/.cache; tests that check the training itself set a fresh PCTUNE_CACHE."""
    import os

    if "PCTUNE_CACHE" not in os.environ:
        os.environ["PCTUNE_CACHE"] = str(tmp_path_factory.mktemp("pctune-cache"))


@pytest.fixture(scope="session", autouse=True)
def isolated_config(tmp_path_factory):
    """pctune's configuration directory (the resume state's signing key, created on first use) is a
    temporary one for the whole session (subprocesses inherit it), never the user's ~/.config."""
    import os

    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))


@pytest.fixture(autouse=True)
def tracking_uri_kept():
    """MLflow's set_tracking_uri (champion registration calls it) leaves MLFLOW_TRACKING_URI in the
    environment; put the session's back so that no later test tracks to a server a test stopped."""
    import os

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is not None and os.environ.get("MLFLOW_TRACKING_URI") != before:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="module")
def cluster():
    """A local Ray for the module's searches (2 CPUs); its address."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with the random-weight demo model files and the search space (``helpers.demo_files``),
    where ``helpers.write_job`` writes jobs."""
    return demo_files(tmp_path_factory.mktemp("search"))


@pytest.fixture(scope="session")
def pvgg16():
    torch.manual_seed(0)
    return pctune.create_model("pvgg16")


@pytest.fixture(scope="session")
def peffnetb0():
    torch.manual_seed(0)
    net = pctune.create_model("peffnetb0")
    _randomize_batchnorm(net.backbone)
    return net


def _randomize_batchnorm(module: torch.nn.Module) -> None:
    """Fresh BatchNorm statistics are the identity; make them non-trivial so tests can see mistakes."""
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
