"""The command lines' failures: bad input ends in one line and exit status 2 (no traceback unless
FACEKD_TRACEBACK=1), as facekd_jax.errors documents; the statuses of a run (0, 75, 1) are tested where they arise
(test_train, test_checkpoint, test_full_disk), the plan's 3 in test_plan."""
import subprocess
import sys

import pytest

from runs import REPO, subprocess_env
from facekd_jax import errors

TINY = f"--config={REPO / 'configs' / 'baseline_resnet56.py'}:tiny"


def _side_by_side(commands, **env):
    """Runs the commands at once (each mostly starts Python, TensorFlow and JAX) -> CompletedProcess-like."""
    procs = [subprocess.Popen(c, cwd=REPO, env=subprocess_env(1, **env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    return [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]


@pytest.mark.slow
def test_bad_input_at_the_command_line_is_one_line_and_exit_status_2(tmp_path):
    main = [sys.executable, "-m", "facekd_jax.main"]
    missing = tmp_path / "no_such_faces"
    (missing_path, unknown_key, no_workdir, bad_spec, suite_file) = _side_by_side([
        main + [TINY, f"--workdir={tmp_path / 'a'}", f"--config.data.train=folder:{missing}"],
        main + [TINY, f"--workdir={tmp_path / 'b'}", "--config.optimizer.lrr=0.1"],
        main + [TINY],
        main + [TINY, f"--workdir={tmp_path / 'c'}", "--config.data.train=nonsense:1"],
        [sys.executable, "-m", "facekd_jax.suite", f"--config={tmp_path / 'absent.py'}",
         f"--workdir={tmp_path / 'd'}"],
    ])
    for (status, _, err), expect in [(missing_path, f"{missing} does not exist"),
                                     (unknown_key, "unknown config key --config.optimizer.lrr"),
                                     (no_workdir, "--workdir=... is required"),
                                     (bad_spec, "config.data.train='nonsense:1': unknown train spec"),
                                     (suite_file, "absent.py does not exist")]:
        assert status == errors.EXIT_USAGE, err[-2000:]
        assert "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and expect in last, last
    assert not (tmp_path / "b").exists() and not (tmp_path / "c" / "checkpoints").exists()  # nothing written


def test_facekd_traceback_shows_the_traceback(tmp_path):
    ((status, _, err),) = _side_by_side(
        [[sys.executable, "-m", "facekd_jax.main", TINY, f"--workdir={tmp_path / 'a'}",
          f"--config.data.train=folder:{tmp_path / 'missing'}"]], FACEKD_TRACEBACK=1)
    assert status != 0 and "Traceback" in err and "FileNotFoundError" in err
