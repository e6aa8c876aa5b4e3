"""Property-based fuzzing of the .bkp reader (and of the validator once it
exists) over mutated good files: only the format's own errors come out, and
nothing allocates memory sized from an unchecked length field.

The run happens in a child process (``tests/bkp_fuzz.py``) whose address
space is capped at what it has mapped after start-up plus ``HEADROOM_MB``:
the good files are a few kilobytes, so any allocation of that size can only
come from a length field, and it fails there with MemoryError, which is not
a format error and fails the test. Hypothesis is derandomized (same
examples on every run); DICOMVAULT_FUZZ_EXAMPLES changes the count.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bkp_synth import small_file
from dicomvault.formats.bkp.reader import BkpReader

HERE = Path(__file__).resolve().parent
HEADROOM_MB = 256


@pytest.fixture(scope="module")
def goldens(tmp_path_factory: pytest.TempPathFactory, pydicom_files: Path) -> list[Path]:
    from dicomvault.cli.main import main

    root = tmp_path_factory.mktemp("fuzz-golden")
    files = [small_file(root / "frames.bkp", seed=1),
             small_file(root / "one-frame.bkp", seed=2, frame_size=1 << 20, series=1, per_series=2),
             small_file(root / "empty.bkp", seed=3, series=1, per_series=0)]
    # and one written by the real command from a real DICOM file
    env = {"DICOMVAULT_DB": str(root / "default-db"), "DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        db = root / "db"
        assert main(["-q", "--db", str(db), "import-dicom", str(pydicom_files / "rtplan.dcm")]) == 0
        assert main(["-q", "--db", str(db), "export-db", str(root / "cli.bkp"), "--whole"]) == 0
    files.append(root / "cli.bkp")
    # and one with manifest pages (format 1.1): the mutations reach the page frames and index
    files.append(Path(__file__).resolve().parent / "golden" / "bkp" / "v1" / "paged.bkp")
    for f in files:
        BkpReader(f).close()
        assert f.stat().st_size < 64 << 10
    return files


@pytest.mark.slow
def test_fuzzed_files_raise_only_format_errors(goldens: list[Path]) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "bkp_fuzz.py"), str(HEADROOM_MB), *map(str, goldens)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert "fuzzed" in proc.stdout
