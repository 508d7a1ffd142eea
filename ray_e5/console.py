"""The console: what a ray-e5 command shows, and the known noise of Ray and the libraries it keeps off it.

Its own module because it is one concern apart from joining Ray: the CLI, the native stderr filter and
``cluster.connect`` all use it. Quiet by default: Ray's and the libraries' known internal noise (Ray Train's
PlacementGroupCleaner state-API warnings, transformers' ``is_gradient_checkpointing`` FutureWarning that peft
triggers, Ray's deprecation warnings, Ray Data's INFO lines, Ray's token-authentication notice, Ray Serve's start-up
narration, mteb's bare bars) is kept out of the console; it stays in Ray's log files (``/tmp/ray/session_latest/logs``
on a local cluster). Everything else the workers print (our progress bars, errors) still reaches the driver.
``ray-e5 --verbose`` (or ``RAY_E5_VERBOSE=1``) shows everything.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import re
import warnings
from typing import Iterator

VERBOSE_ENV = "RAY_E5_VERBOSE"

# Python warnings that are known noise, as (message prefix, category): filtered in the driver, and in every worker
# through PYTHONWARNINGS (same syntax as -W: the message is a literal prefix, so no ':' or ',' in it).
NOISY_WARNINGS = (("`is_gradient_checkpointing` is deprecated", "FutureWarning"),
                  # sklearn's UndefinedMetricWarning (a UserWarning) on classes a probe never predicts
                  ("Precision is ill-defined", "UserWarning"), ("Recall is ill-defined", "UserWarning"),
                  ("F-score is ill-defined", "UserWarning"),
                  ("To copy construct from a tensor", "UserWarning"))  # mteb's bitext-mining evaluator
# Log lines that are known noise: the workers' (forwarded to the driver) and the driver's native ones (native_stderr).
NOISY_LINES = re.compile(r"PlacementGroupCleaner|Failed to query Ray Train Controller actor state|"
                         r"FutureWarning: `is_gradient_checkpointing`|RayDeprecationWarning|"
                         # Ray Train's controller and workers narrating their start-up and every checkpoint
                         r"Requesting resources: |Attempting to start training worker group|"
                         r"Started training worker group|^- \(ip=.*world_rank=|Setting up process group for|"
                         r"Checkpoint successfully created at|Reporting training result \d+|"
                         r"has constructor arguments in the object store and max_restarts|"
                         r"Progress bars disabled\. To enable|"
                         # transformers' GGUF load bar, DeepSpeed's CPU notice, Ray Data's per-dataset summary
                         r"Converting and de-quantizing GGUF tensors|Setting accelerator to CPU\. If you have GPU|"
                         r"Dataset \S+ execution finished in|"
                         # mteb's own bars, drawn whatever show_progress_bar says
                         r"Matching sentences: |Standardizing text corpus format|"
                         # bars without a description (mteb's evaluators' encode loops); ours always have one
                         r"^\s*\d+%\|[^|]*\| *\d+/\d+ \[|"
                         # Ray Serve's controller and proxies narrating start-up (warnings, errors and the
                         # replicas' access log still pass)
                         r"^INFO \d{4}-\d\d-\d\d [\d:,]+ (controller|proxy) |"
                         # a replica narrating its own HTTP server's start (its access log lines still pass)
                         r" -- (Allocated port \d+ for|Successfully started RequestProtocol|Started HTTP server on)")


# Ray's own driver-side log lines that are known noise: (logger, message prefix).
NOISY_RECORDS = (("ray._private.authentication.authentication_token_setup", "Token authentication is enabled"),
                 ("ray.serve", "Started Serve in namespace"), ("ray.serve", "Connecting to existing Serve app"),
                 ("ray.serve", "Application 'ray-e5' is ready"))  # our own line says where it serves


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """These loggers below ``level`` for the duration, unless verbose: for library narration in a process whose
    logging another library set up (Ray Train's workers log INFO, so mteb's "Running task ..." would reach the
    console at every dev evaluation)."""
    if verbose():
        yield
        return
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before):
            lg.setLevel(lvl)


def quiet_warnings() -> None:
    """Driver-side filters for the known noise (scoped by message or by Ray's own deprecation category)."""
    for message, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=getattr(builtins, category))
    try:
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)  # after Ray's own "module" filter
    except ImportError:
        pass


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_records() -> None:
    """Logger-level filters for Ray's known driver-side notices (they apply to those loggers' records only)."""
    for name, prefix in NOISY_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))


def _worker_pythonwarnings() -> str:
    ours = [f"ignore:{message}:{category}" for message, category in NOISY_WARNINGS]
    theirs = os.environ.get("PYTHONWARNINGS")
    return ",".join([*([theirs] if theirs else []), *ours])


def drop_noise(data: dict) -> dict | None:
    """A batch of forwarded worker log lines without the known noise (None: nothing left to print)."""
    if NOISY_LINES.search(str(data.get("actor_name") or "")):
        return None
    lines, dropping = [], False
    for line in data.get("lines", []):
        if NOISY_LINES.search(line):
            dropping = True  # a warning's source line and a traceback's indented lines follow it
            continue
        if dropping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        dropping = False
        lines.append(line)
    return {**data, "lines": lines} if lines else None


def _filter_worker_logs() -> bool:
    """Replace Ray's driver-side printer of worker logs by one that drops the known noisy lines.

    Ray exposes no public hook for this; its dispatcher is private, so any change there leaves Ray's own printer in
    place (everything printed, as with --verbose) rather than failing.
    """
    try:
        import functools

        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        printer = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=ignore_prefix)
        if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
            return False  # worker logs are not forwarded at all (log_to_driver=False)
    except (ImportError, AttributeError):
        return False

    def filtered(data):
        kept = drop_noise(data)
        if kept is not None:
            printer(kept)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)  # same name: ray.shutdown() removes it
    return True


def _quiet_ray_data() -> None:
    """Ray Data's INFO lines (execution plans, operator progress) go to its log file only, not the console."""
    import ray.data  # noqa: F401  (its logging is configured when imported)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _DropPrefix) for f in handler.filters):
                handler.addFilter(_DropPrefix("Progress bars disabled"))  # we draw our own bars
