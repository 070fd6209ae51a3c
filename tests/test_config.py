"""The project config: one typed reader that validates keys and types, and reads
the project it is given (never the current directory behind the caller's back)."""

from __future__ import annotations

import pytest

from gpuflow.config import (
    ClusterSettings,
    SandboxSshSettings,
    SyncSettings,
    project_config,
    read_project_config,
)
from gpuflow.errors import ConfigError


def _error(tmp_path, text: str, name: str = "gpuflow.toml") -> str:
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as error:
        read_project_config(tmp_path)
    return error.value.one_line()


def test_settings_land_in_typed_sections(tmp_path):
    (tmp_path / "gpuflow.toml").write_text(
        'cluster = "exp"\nsandbox = true\nregion = "eu-west-1"\ninstance-type = "g6.xlarge"\nmax_hours = 2\n'
        'spot = true\nsync_warn_gb = 3\nremote_python = "/opt/py"\ntensorflow_dlami = "2.17"\n'
        '[sandbox_ssh]\nport = 2222\nuser = "me"\nhost-key = "/k.pub"\n'
    )
    config = read_project_config(tmp_path)
    assert config.source == tmp_path / "gpuflow.toml" and config.root == tmp_path.resolve()
    assert (config.cluster_name, config.sandbox, config.jobs.remote_python) == ("exp", True, "/opt/py")
    assert config.cluster == ClusterSettings(
        region="eu-west-1", instance_type="g6.xlarge", max_hours=2.0, spot=True, tensorflow_dlami="2.17"
    )
    assert isinstance(config.cluster.max_hours, float)
    assert config.sync == SyncSettings(sync_warn_gb=3.0)
    assert config.sandbox_ssh == SandboxSshSettings(port=2222, user="me", host_key="/k.pub")
    assert config.cluster.instance_type == "g6.xlarge" and config.sandbox_ssh.host_key == "/k.pub"
    with pytest.raises(AttributeError):
        config.sandbox = False  # frozen


def test_a_gpuflow_table_and_pyproject(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.gpuflow]\ncount = 2\n')
    assert read_project_config(tmp_path).cluster.count == 2
    (tmp_path / "gpuflow.toml").write_text('[gpuflow]\ncount = 3\n')  # gpuflow.toml wins
    assert read_project_config(tmp_path).cluster.count == 3
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    (tmp_path / "gpuflow.toml").unlink()
    config = read_project_config(tmp_path)
    assert (config.source, config.cluster) == (None, ClusterSettings())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('region = "x"\nmax_hour = 1\n', "gpuflow.toml:2: unknown setting 'max_hour' (did you mean 'max_hours'?)"),
        ("instance_typ = 'g5'\n", "gpuflow.toml:1: unknown setting 'instance_typ' (did you mean 'instance_type'?)"),
        ('[sandbox_ssh]\nport = 22\nusr = "me"\n',
         "gpuflow.toml:3: unknown setting 'usr' in [sandbox_ssh] (did you mean 'user'?)"),
        ('[gpuflow]\nspot-fallbak = true\n',
         "gpuflow.toml:2: unknown setting 'spot-fallbak' in [gpuflow] (did you mean 'spot_fallback'?)"),
        ('region = "x"\n[gpuflow]\ncount = 1\n', "gpuflow.toml:1: 'region' is outside the [gpuflow] table"),
        ("zzzzzz = 1\n", "gpuflow.toml:1: unknown setting 'zzzzzz' (known settings: allow_cpu, ami, cluster,"),
        ('instance-type = "a"\ninstance_type = "b"\n', "gpuflow.toml:2: instance_type is set twice"),
        ("count = true\n", "gpuflow.toml:1: count must be of type int, got True"),
        ("spot = 'yes'\n", "gpuflow.toml:1: spot must be of type bool, got 'yes'"),
        ('[sandbox_ssh]\nport = "22"\n', "gpuflow.toml:2: port must be of type int, got '22'"),
        ("sandbox_ssh = 1\n", "gpuflow.toml:1: sandbox_ssh must be a table"),
        ("tensorflow_dlami = 2.18\n", "gpuflow.toml:1: tensorflow_dlami must be of type str, got 2.18"),
        ('tensorflow_dlami = "latest"\n', 'tensorflow_dlami must be a TensorFlow version such as "2.18"'),
        ('cluster = "a"\nname = "b"\n', "cluster and name disagree"),
    ],
)
def test_unknown_keys_and_wrong_types_name_file_line_and_fix(tmp_path, text, expected):
    error = _error(tmp_path, text)
    assert expected in error and error.startswith(str(tmp_path / "gpuflow.toml"))


def test_pyproject_keys_are_checked_in_tool_gpuflow_only(tmp_path):
    text = '[project]\nname = "x"\nmax_hour = 1\n\n[tool.gpuflow]\nregion = "x"\nmax_hour = 1\n'
    error = _error(tmp_path, text, "pyproject.toml")
    assert error.startswith(f"{tmp_path / 'pyproject.toml'}:7: unknown setting 'max_hour' in [tool.gpuflow]")
    assert error.endswith("(did you mean 'max_hours'?)")
    (tmp_path / "pyproject.toml").write_text('[tool]\ngpuflow = 3\n')
    with pytest.raises(ConfigError, match=r"pyproject\.toml: \[tool\.gpuflow\] must be a table"):
        read_project_config(tmp_path)


def test_read_project_config_reads_the_directory_given_not_the_current_one(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "gpuflow.toml").write_text('region = "eu-west-1"\n')
    (elsewhere / "gpuflow.toml").write_text('region = "ap-south-1"\n')
    monkeypatch.chdir(elsewhere)
    assert read_project_config(project).cluster.region == "eu-west-1"
    # a caller that names no project gets the one around the current directory
    assert project_config(project).cluster.region == "eu-west-1"
    assert project_config(None).cluster.region == "ap-south-1"


def test_a_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "gpuflow.toml").write_bytes(b'\xef\xbb\xbfregion = "eu-west-1"\n')
    assert read_project_config(tmp_path).cluster.region == "eu-west-1"
