"""The manifest's environment probe lists the installed distributions exactly as
``d.metadata["Name"]`` / ``d.version`` name them, from each METADATA's header block alone."""

from __future__ import annotations

import json
import subprocess
import sys

from gpuflow.jobs.scripts import ENVIRONMENT_PROBE_PY

EMAIL_PARSER_WAY = (
    "import json; from importlib import metadata\n"
    "print(json.dumps(sorted({f'{d.metadata[\"Name\"]}=={d.version}' for d in metadata.distributions()"
    " if d.metadata['Name']}, key=str.lower)))"
)
DISTRIBUTIONS = {
    # a body after the headers that looks like headers, a Windows line ending in it
    "alpha_pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: Alpha_Pkg\nVersion: 1.0\n\nName: Fake\r\nVersion: 9\n",
    # an egg: PKG-INFO
    "beta.egg-info/PKG-INFO": "Metadata-Version: 1.0\nName: beta\nVersion: 2.0b1\nSummary: b\n",
    # a folded header before Name, a tab after the colon, a repeated Name (the first wins)
    "gamma-3.dist-info/METADATA": "Metadata-Version: 2.1\nSummary: x\n  Name: folded\nName:\tgamma\nVersion: 3 \nName: other\n",
    "nameless-1.dist-info/METADATA": "Metadata-Version: 2.1\nVersion: 1\n",  # no Name: left out
}


def _run(source: str, site) -> list[str] | dict:
    done = subprocess.run([sys.executable, "-S", "-c", source], capture_output=True, text=True, timeout=60,
                          check=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout)


def test_the_probe_names_distributions_as_the_email_parser_does(tmp_path):
    for relative, text in DISTRIBUTIONS.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True)
        path.write_text(text)
    listed = _run(ENVIRONMENT_PROBE_PY, tmp_path)["pip_freeze"]
    assert listed == _run(EMAIL_PARSER_WAY, tmp_path)
    assert {"Alpha_Pkg==1.0", "beta==2.0b1", "gamma==3 "} <= set(listed) and not any("Fake" in item for item in listed)
