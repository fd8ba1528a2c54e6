"""How xsam talks to people: Python `logging` at three verbosities, and the known-harmless noise of
the libraries underneath (Ray, Ray Train, Ray Data, DeepSpeed, torch, MLflow) turned down.

    quiet    warnings, errors and the command's result (the final summary is a `print`) only
    normal   + INFO: one progress line per step / stage / benchmark            (the default)
    verbose  + DEBUG of xsam, and nothing of the libraries silenced

Entry points:  `add_arguments(parser)`, then `setup(verbosity_of(args))` first thing in main.
Ray:           `ray.init(**ray_init_kwargs(verbosity, env_vars))`: the runtime_env carries
               XSAM_VERBOSITY and `worker_setup` (a worker_process_setup_hook run in every worker
               process of the job, detached actors such as Ray Train's PlacementGroupCleaner included),
               which applies the same rules there. `train_logging_config(verbosity)` goes into Ray
               Train's RunConfig(logging_config=...) to drop its per-report INFO lines.

Command-line mistakes: a check raises `UserError` (or a subclass: export.ExportError, ...) naming the
file / field; each entry point's main runs inside `cli_errors(prog, verbosity)`, which answers it with
ONE line on stderr and exit status 2 - no traceback (other exceptions are bugs and keep theirs; at
verbose a UserError prints its traceback too).

Every handler installed here (and those the libraries attach) carries `RedactFilter`: credentials in a
URI (`scheme://user:secret@host`) and AWS keys are masked before anything is written.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import sys
import threading
import traceback
import warnings
from contextlib import contextmanager

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
LEVELS = (QUIET, NORMAL, VERBOSE)
ENV = "XSAM_VERBOSITY"  # how the driver's choice reaches Ray worker processes
TTY_ENV = "XSAM_TTY"  # "1" when the driver's stderr is a terminal (workers' never is)

# Library loggers whose INFO / WARNING lines say nothing a user acts on, with the reason, and the level
# they get at normal / quiet verbosity (verbose leaves every library at its own default).
NOISY_LOGGERS: dict[str, tuple[int, str]] = {
    # Ray Train v2's detached cleaner asks the State API (served by the dashboard) every second whether
    # the controller lives; with include_dashboard=False every ask fails with a WARNING, and a cleaner
    # that cannot ask only loses its crash-cleanup role (the controller removes its placement group).
    "ray.train.v2._internal.execution.controller.placement_group_cleaner":
        (logging.ERROR, "PlacementGroupCleaner: 'Failed to query ... State API' once a second"),
    # 'Failed to send resource request ... safe to ignore' + a GetTimeoutError traceback: the controller's
    # autoscaler request timing out on a busy CPU (retried; only a persisting failure matters)
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client":
        (logging.ERROR, "autoscaler request timeouts under CPU load"),
    # 'Started a local Ray instance', 'Token authentication is enabled ...' (a local head on loopback)
    "ray._private.worker": (logging.WARNING, "ray.init's INFO banner"),
    "ray._private.authentication": (logging.ERROR, "token-auth notice of a local throwaway head"),
    # 'Starting execution of Dataset', 'Execution plan ...', 'A new progress UI is available'
    "ray.data": (logging.WARNING, "Ray Data's per-dataset INFO lines (the step logs its own summary)"),
    # 'Creating initial MLflow database tables...', 'Updating database tables', alembic migrations
    "mlflow.store.db.utils": (logging.WARNING, "MLflow's sqlite schema creation"),
    "alembic": (logging.WARNING, "MLflow's schema migrations"),
    # '🏃 View run ... at: <tracking URI>' per ended run (and the URI may carry credentials)
    "mlflow.tracking._tracking_service.client": (logging.WARNING, "MLflow's per-run 'View run at' line"),
    # 'No CUDA runtime is found, using CUDA_HOME=...' on a CPU worker building DeepSpeed's shm op
    "torch.utils.cpp_extension": (logging.ERROR, "CUDA_HOME notice on CPU-only workers"),
    # DeepSpeed's INFO config dumps and per-step timers (steps_per_print is off, these are the rest)
    "DeepSpeed": (logging.WARNING, "DeepSpeed's INFO lines"),
    "deepspeed": (logging.WARNING, "DeepSpeed's INFO lines"),
    # 'Loading checkpoint shards' bars and advisory notes when candidates / evaluation load exports
    "transformers": (logging.ERROR, "transformers' advisory warnings and loading notes"),
}

# Ray modules that name their logger by FILE PATH (`logging.getLogger(__file__)`), so their records miss
# the `ray.train` logger and Ray Train's own log-level filter: 'Reporting training result N:
# TrainingReport(...)' (up to 1,200 characters, once per report per worker) comes from the first.
RAY_FILE_LOGGERS: dict[str, tuple[int, str]] = {
    "train/v2/_internal/execution/context.py": (logging.WARNING, "Ray Train's per-report result dicts"),
    "train/collective/collectives.py": (logging.WARNING, "Ray Train collective INFO lines"),
}

# Python warnings known to be harmless here: (message regex, category, module regex or "", reason).
NOISY_WARNINGS: tuple[tuple[str, type[Warning], str, str], ...] = (
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning, "",
     "DeepSpeed's ZeRO calls the renamed collective; same operation"),
    (r"`torch\.distributed\._all_gather_base` is a private function", FutureWarning, "",
     "older DeepSpeed paths, same operation"),
    (r"`torch\.distributed\._reduce_scatter_base` is a private function", FutureWarning, "",
     "older DeepSpeed paths, same operation"),
    (r"Add type hints to the `predict` method", UserWarning, "",
     ("xsam's pyfunc checks its own rows (paths, bytes, base64, arrays: xsam.model.pyfunc.rows_of), which "
      "MLflow's type-hint schemas cannot express")),
)

# Environment for every Ray worker process (runtime_env env_vars) at normal / quiet verbosity.
QUIET_WORKER_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # Ray Data's tqdm bars (DataContext.enable_progress_bars)
    # Ray Data configures its `ray.data` logger itself on import (over the hook's level); this env var is
    # what it reads: 'Starting execution of Dataset', 'Execution plan', 'A new progress UI', '✔️ finished'
    # go (also from logs/ray-data.log - verbose keeps them)
    "RAY_DATA_LOG_LEVEL": "WARNING",
    # Ray Train routes a worker's print() into the root logger even inside contextlib.redirect_stdout
    # (it tees), so the library prints the recipe captures ('deepspeed_shm_comm_op built successfully')
    # would still reach the console; off, print() is plain stdout again (still in the worker's .out log)
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TQDM_DISABLE": "1",  # other tqdm bars in workers (transformers' 'Loading checkpoint shards', ...)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}

_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@")
_AWS_KEYS = re.compile(r"(?P<k>(?:aws_secret_access_key|AWS_SECRET_ACCESS_KEY|aws_session_token|"
                       r"AWS_SESSION_TOKEN)\s*[=:]\s*)\S+|(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")


def redact(text: str) -> str:
    """`text` with URI credentials (`scheme://user:pw@` -> `scheme://***@`) and AWS keys masked."""
    text = _URI_CREDENTIALS.sub(lambda m: f"{m['scheme']}***@", text)
    return _AWS_KEYS.sub(lambda m: f"{m['k']}***" if m["k"] else "***", text)


class UserError(ValueError):
    """A mistake of the person running a command (a missing or empty folder, a truncated file, a value of
    the wrong shape): its message names the file / field and what is wrong, in one line."""


USER_ERROR_EXIT = 2  # what argparse exits with on a bad argument, too


@contextmanager
def cli_errors(prog: str, verbosity: str | None = None, also: tuple[type[BaseException], ...] = ()):
    """Run an entry point's body: a UserError (or one of `also`: a module's own mistake types) becomes
    `[prog] error: <message>` on stderr (credentials masked, one line) and SystemExit(2); at verbose the
    traceback is printed first. Every other exception propagates with its traceback: that is a bug."""
    try:
        yield
    except (UserError, *also) as e:
        if (verbosity or current()) == VERBOSE:
            traceback.print_exc()
        message = " ".join(redact(str(e)).split()) or type(e).__name__
        print(f"[{prog}] error: {message}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None


def entry_point(prog: str, also: tuple[type[BaseException], ...] = ()):
    """Decorator for a console script's main(argv): its body runs inside cli_errors(prog, also=also)."""
    import functools

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            with cli_errors(prog, also=also):
                return main(*args, **kwargs)

        return run

    return wrap


class RedactFilter(logging.Filter):
    """Masks credentials in a record's final message (args merged in) before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


class _Format(logging.Formatter):
    """INFO and below: the message alone (progress lines carry their own `[step]` prefix);
    WARNING and above: `WARNING name: message`. Verbose: time, level and logger name on every line."""

    def __init__(self, verbose: bool):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
                         datefmt="%H:%M:%S")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.verbose and record.levelno >= logging.WARNING:
            text = f"{record.levelname} {record.name}: {text}"
        return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """-q/--quiet and -v/--verbose (mutually exclusive) on an entry point's parser."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="warnings, errors and the final result only")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="debug lines, and the libraries' own output (Ray, DeepSpeed, MLflow) unfiltered")


def verbosity_of(args: argparse.Namespace) -> str:
    """The verbosity the parsed -q / -v ask for (neither: the environment's XSAM_VERBOSITY, else normal)."""
    if getattr(args, "quiet", False):
        return QUIET
    if getattr(args, "verbose", False):
        return VERBOSE
    return current()


def current() -> str:
    """The verbosity of this process: XSAM_VERBOSITY when set to a known value, else normal."""
    value = os.environ.get(ENV, NORMAL)
    return value if value in LEVELS else NORMAL


def _check(verbosity: str) -> str:
    if verbosity not in LEVELS:
        raise ValueError(f"verbosity: {verbosity!r} is not one of {', '.join(LEVELS)}")
    return verbosity


def setup(verbosity: str = NORMAL, stream=None) -> None:
    """Configure this process (an entry point's driver): the `xsam` logger's level and handler (stderr),
    the library noise filters (not at verbose), and XSAM_VERBOSITY / XSAM_TTY in the environment so
    that processes started from here (Ray workers of a local cluster, subprocesses) follow."""
    _check(verbosity)
    stream = stream if stream is not None else sys.stderr
    os.environ[ENV] = verbosity
    os.environ[TTY_ENV] = "1" if getattr(stream, "isatty", lambda: False)() else "0"
    _configure(verbosity, stream)


def worker_setup() -> None:
    """Ray's worker_process_setup_hook (runtime_env): the driver's rules in a worker process (its
    verbosity from XSAM_VERBOSITY). Worker output reaches the driver's console through log_to_driver."""
    verbosity = current()
    _configure(verbosity, sys.stderr)
    if verbosity != VERBOSE:
        threading.excepthook = _cleaner_excepthook(threading.excepthook)


def _cleaner_excepthook(previous):
    """A threading.excepthook that turns the PlacementGroupCleaner monitor thread's ConnectionError
    ('Found multiple active Ray instances': the State API client looks the cluster up by address and
    finds several local heads - another user's or a test's) into one DEBUG line instead of a 24-line
    traceback; the cleaner then stops watching, as it does today. Every other thread: `previous`."""

    def hook(args):
        if args.thread is not None and args.thread.name == "PlacementGroupCleanerMonitor" \
                and issubclass(args.exc_type, ConnectionError):
            logging.getLogger("xsam.logs").debug("PlacementGroupCleaner monitor stopped: %s", args.exc_value)
            return
        previous(args)

    return hook


def _configure(verbosity: str, stream) -> None:
    verbose = verbosity == VERBOSE
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Format(verbose))
    handler.addFilter(RedactFilter())
    handler.set_name("xsam")
    pkg = logging.getLogger("xsam")
    for h in [h for h in pkg.handlers if h.get_name() == "xsam"]:  # setup twice: replace, not duplicate
        pkg.removeHandler(h)
    pkg.addHandler(handler)
    pkg.propagate = False
    pkg.setLevel({QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}[verbosity])
    if verbose:
        if not any(h.get_name() == "xsam" for h in logging.root.handlers):
            root = logging.StreamHandler(stream)
            root.setFormatter(_Format(True))
            root.addFilter(RedactFilter())
            root.set_name("xsam")
            logging.root.addHandler(root)
        logging.root.setLevel(logging.INFO)
    else:
        quiet_libraries()
    redact_library_handlers()


def quiet_libraries() -> None:
    """Apply NOISY_LOGGERS and NOISY_WARNINGS to this process (normal and quiet verbosity)."""
    for name, (level, _why) in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    ray_spec = importlib.util.find_spec("ray")  # locates the package without importing it
    if ray_spec is not None and ray_spec.origin:
        for rel, (level, _why) in RAY_FILE_LOGGERS.items():
            logging.getLogger(os.path.join(os.path.dirname(ray_spec.origin), rel)).setLevel(level)
    for message, category, module, _why in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for key, value in QUIET_WORKER_ENV.items():
        os.environ.setdefault(key, value)


def redact_library_handlers() -> None:
    """Add RedactFilter to every handler already attached to a logger (Ray's and MLflow's own ones
    do not propagate to ours), so a library echoing a URI with credentials is masked too."""
    loggers = [logging.root] + [lg for lg in logging.root.manager.loggerDict.values()
                                if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if not any(isinstance(f, RedactFilter) for f in h.filters):
                h.addFilter(RedactFilter())


def worker_env(verbosity: str, local_cluster: bool = False) -> dict[str, str]:
    """Environment variables for every Ray worker process of the job (runtime_env env_vars).
    `local_cluster`: the driver started its own Ray (no address): no node of it is ever drained or
    preempted, so Ray Train's PreemptionWatcher is off - it polls for nothing and its actor creation logs
    a C++ ERROR line per stage ('PreemptionWatcher ... has constructor arguments in the object store')."""
    env = {ENV: _check(verbosity), TTY_ENV: os.environ.get(TTY_ENV, "0")}
    if verbosity != VERBOSE:
        env.update(QUIET_WORKER_ENV)
    if local_cluster:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


def runtime_env(verbosity: str, env_vars: dict[str, str] | None = None, local_cluster: bool = False) -> dict:
    """A Ray runtime_env: `env_vars` plus worker_env(verbosity, local_cluster), and `worker_setup` as
    the worker_process_setup_hook (a module path: the worker imports xsam.logs, no pickled closure)."""
    return {"env_vars": {**(env_vars or {}), **worker_env(verbosity, local_cluster)},
            "worker_process_setup_hook": "xsam.logs.worker_setup"}


def ray_init_kwargs(verbosity: str, env_vars: dict[str, str] | None = None, local_cluster: bool = False) -> dict:
    """Keyword arguments for `ray.init` (merge with address / num_cpus): the runtime_env above, and
    worker output forwarded to this console (the workers' progress lines are xsam log lines; the
    libraries' noise is already cut at its source by the hook). At verbose, Ray's own INFO too."""
    return {"runtime_env": runtime_env(verbosity, env_vars, local_cluster), "log_to_driver": True}


def train_logging_config(verbosity: str):
    """Ray Train's `RunConfig(logging_config=...)`: WARNING drops its per-report INFO lines
    ('Reporting training result N: TrainingReport(...)', 'Checkpoint successfully created at ...',
    'Requesting resources', 'Started training worker group', 'Setting up process group')."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if _check(verbosity) == VERBOSE else "WARNING")


def drain_ray(wait_s: float = 1.0) -> None:
    """Before an entry point prints its final summary: give the workers' last lines `wait_s` to reach
    this console, then disconnect from Ray, which prints what Ray's log deduplication still holds
    ('[repeated Nx across cluster]'), so nothing of the workers lands after the summary."""
    import time

    import ray

    if ray.is_initialized():
        time.sleep(wait_s)
        ray.shutdown()
