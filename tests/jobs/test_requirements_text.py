"""The project's requirements file is text the user wrote: not UTF-8 is one clear line
naming the file and the line (exit 2), never an "unexpected" error."""

from __future__ import annotations

import pytest

from gpuflow.errors import ConfigError
from gpuflow.jobs.environment import requirements_of


def test_a_non_utf8_requirements_file_names_the_file_and_line(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_bytes(b"numpy==2.4\n# caf\xe9 (latin-1)\n")
    with pytest.raises(ConfigError) as raised:
        requirements_of(tmp_path)
    line = raised.value.one_line()
    assert f"{requirements}:2:" in line and "UTF-8" in line and "\n" not in line
    assert raised.value.exit_code == 2


def test_a_utf8_requirements_file_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "requirements.txt").write_bytes(b"\xef\xbb\xbfnumpy==2.4\n")
    assert requirements_of(tmp_path) == "numpy==2.4\n"
