"""Output people can read (xsam.logs, xsam.train.progress, the evaluation progress line): verbosity
levels, the noise filters, credential masking, and the progress lines' format and rate. Fast, no Ray."""

import argparse
import importlib
import io
import logging
import os
import warnings

import pytest

from xsam import logs
from xsam.eval.engine_io import Progress
from xsam.train.progress import StageProgress, duration


@pytest.fixture
def clean_logging():
    """Undo what logs.setup does to the process (logger levels / handlers, env vars)."""
    names = ["xsam", *logs.NOISY_LOGGERS]
    saved = {n: (lg.level, list(lg.handlers), lg.propagate) for n in names for lg in [logging.getLogger(n)]}
    root = (logging.root.level, list(logging.root.handlers))
    env = {k: os.environ.get(k) for k in [logs.ENV, logs.TTY_ENV, *logs.QUIET_WORKER_ENV]}
    yield
    for n, (level, handlers, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate
    logging.root.setLevel(root[0])
    logging.root.handlers[:] = root[1]
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_line_has_step_total_loss_rate_and_eta():
    clock = Clock()
    p = StageProgress("s3", 400, clock=clock, tty=False)
    clock.t = 96.0
    line = p.line(120, 2.3141, 12.5, clock())
    assert line.startswith("[train s3] step 120/400 (30%)  loss 2.314  12.5 samples/s  elapsed 1m36s")
    assert line.endswith("ETA 3m44s")  # 96 s for 120 steps -> 280 steps left at 0.8 s
    assert p.line(400, float("nan"), None, clock()).endswith("done") and "loss -" in p.line(1, None, None, 0)
    # a resumed stage: the rate (and so the ETA) counts only the steps done since the resume
    r = StageProgress("s1", 100, start=50, clock=clock, tty=False)
    clock.t += 10
    assert r.line(60, 1.0, 4.0, clock()).endswith("ETA 40s")
    assert [duration(s) for s in (5, 185, 7620, 273600)] == ["5s", "3m05s", "2h07m", "3d04h"]


def test_progress_without_a_terminal_writes_a_bounded_number_of_lines(clean_logging):
    logs.setup(logs.NORMAL, stream=io.StringIO())
    clock = Clock()
    long_run = StageProgress("s2", 1000, clock=clock, tty=False, every_frac=0.1, min_gap_s=30)
    written = []
    for step in range(1, 1001):
        clock.t += 2.0  # 2000 s in all: every 10% mark is > 30 s after the previous line
        if (text := long_run.update(step, 1.0, 8.0)) is not None:
            written.append(text)
    assert len(written) == 10 and written[0].startswith("[train s2] step 100/1000")
    assert written[-1].startswith("[train s2] step 1000/1000 (100%)") and written[-1].endswith("done")
    # a fast stage (all steps inside min_gap_s): the last line only; the loss is computed only then
    fast, asked = StageProgress("s1", 50, clock=clock, tty=False), []
    for step in range(1, 51):
        clock.t += 0.01
        fast.update(step, lambda: asked.append(1) or 0.5, 100.0)
    assert fast.lines == 1 and len(asked) == 1
    # a resumed stage does not repeat the marks it passed before the resume
    resumed = StageProgress("s1", 100, start=55, clock=clock, tty=False, min_gap_s=0)
    lines = [resumed.update(s, 1.0, 1.0) for s in range(56, 101)]
    assert [t.split()[3] for t in lines if t] == ["60/100", "70/100", "80/100", "90/100", "100/100"]


def test_progress_on_a_terminal_rewrites_one_line(clean_logging):
    logs.setup(logs.NORMAL, stream=io.StringIO())
    clock, out = Clock(), io.StringIO()
    p = StageProgress("s3", 20, clock=clock, tty=True, tty_gap_s=0.5, stream=out)
    for step in range(1, 21):
        clock.t += 0.3
        p.update(step, 1.0, 2.0)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("done\n") and text.count("\r") == p.lines > 5


def test_verbosity_levels_and_credentials_masked(clean_logging):
    log = logging.getLogger("xsam.some.module")
    for verbosity, shown in [(logs.QUIET, {"WARNING"}), (logs.NORMAL, {"INFO", "WARNING"}),
                             (logs.VERBOSE, {"DEBUG", "INFO", "WARNING"})]:
        out = io.StringIO()
        logs.setup(verbosity, stream=out)
        for level in ("DEBUG", "INFO", "WARNING"):
            log.log(getattr(logging, level), "line at %s", level)
        assert {w.split()[-1] for w in out.getvalue().splitlines()} == shown, verbosity
        assert os.environ[logs.ENV] == verbosity and len(logging.getLogger("xsam").handlers) == 1
    out = io.StringIO()
    logs.setup(logs.NORMAL, stream=out)
    log.info("tracking %s", "https://alice:s3cr3t@mlflow.example.org/api and s3://AKIAABCDEFGHIJKLMNOP/x")
    log.warning("env AWS_SECRET_ACCESS_KEY=abcd/efgh and postgresql://u:p@db:5432/mlflow")
    text = out.getvalue()
    assert "s3cr3t" not in text and "AKIAABCDEFGHIJKLMNOP" not in text and "abcd/efgh" not in text
    assert "https://***@mlflow.example.org/api" in text and "postgresql://***@db:5432/mlflow" in text
    assert "WARNING xsam.some.module: env AWS_SECRET_ACCESS_KEY=***" in text


def test_library_noise_is_cut_at_normal_and_kept_at_verbose(clean_logging):
    logs.setup(logs.NORMAL, stream=io.StringIO())
    cleaner = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    assert not logging.getLogger(cleaner).isEnabledFor(logging.WARNING)
    assert not logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.INFO)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        logs.quiet_libraries()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    for name in logs.NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    logs.setup(logs.VERBOSE, stream=io.StringIO())
    assert logging.getLogger(cleaner).isEnabledFor(logging.WARNING)


def test_arguments_and_ray_settings():
    p = argparse.ArgumentParser()
    logs.add_arguments(p)
    assert logs.verbosity_of(p.parse_args(["-q"])) == logs.QUIET
    assert logs.verbosity_of(p.parse_args(["--verbose"])) == logs.VERBOSE
    with pytest.raises(SystemExit):
        p.parse_args(["-q", "-v"])
    with pytest.raises(ValueError, match="verbosity: 'loud' is not one of quiet, normal, verbose"):
        logs.worker_env("loud")
    kw = logs.ray_init_kwargs(logs.NORMAL, {"HF_HUB_OFFLINE": "1"})
    env = kw["runtime_env"]["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "1" and env[logs.ENV] == "normal" and env["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    module, _, func = kw["runtime_env"]["worker_process_setup_hook"].rpartition(".")
    assert getattr(importlib.import_module(module), func) is logs.worker_setup
    assert "RAY_DATA_DISABLE_PROGRESS_BARS" not in logs.worker_env(logs.VERBOSE)
    assert logs.train_logging_config(logs.NORMAL).log_level == "WARNING"
    assert logs.train_logging_config(logs.VERBOSE).log_level == "INFO"


def test_eval_progress_short_benchmark_is_debug_long_one_info(clean_logging):
    out = io.StringIO()
    logs.setup(logs.NORMAL, stream=out)
    short = Progress("fixture_refcoco/val", 3, every_s=30.0)
    short.update(3, 9)
    short.close()
    assert out.getvalue() == ""
    slow = Progress("fixture_ade20k/val", 10, every_s=1e-9)
    slow.update(4, 4)
    slow.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[eval] fixture_ade20k/val: 4/10 images")
    assert lines[1].endswith("(done)")
