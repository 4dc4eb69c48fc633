"""checkov finds no failed check on what the chart renders (every ci/ values file and the
defaults) nor on the raw RayJob example, beyond the commented skip list in checkov-skips.txt."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from deploy.conftest import CI_VALUES, RAW_RAYJOB, template

SKIPS = Path(__file__).resolve().parent / "checkov-skips.txt"


def skip_list() -> list[str]:
    checks = []
    for line in SKIPS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            check, _, reason = line.partition(" ")
            assert reason.strip(), f"{check}: every skipped check needs its reason"
            checks.append(check)
    return checks


def test_checkov_passes_on_rendered_chart(helm, checkov, tmp_path):
    for values in [None, *CI_VALUES]:
        out = template(helm, *([values] if values else []))
        assert out.returncode == 0, out.stderr
        (tmp_path / f"{values.stem if values else 'defaults'}.yaml").write_text(out.stdout)
    shutil.copy(RAW_RAYJOB, tmp_path / "raw-rayjob.yaml")
    run = subprocess.run(
        [
            str(checkov),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--quiet",
            "--compact",
            "-o",
            "json",
            "--skip-check",
            ",".join(skip_list()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    reports = json.loads(run.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [
        f"{f['check_id']} {f['check_name']}: {f['resource']} ({Path(f['file_path']).name})"
        for r in reports
        for f in r["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert sum(r["summary"]["passed"] for r in reports) > 100, "checkov checked next to nothing"
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports)
