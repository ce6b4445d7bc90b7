"""The ``vllm`` command installed by lvllm (also installed as ``lvllm``): dispatch only.

``vllm plan`` and ``vllm doctor`` run lvllm's own subcommands (LVLLM_COMMANDS); ``vllm serve``
of a model that looks like a path (``./model``, ``/data/x``, ``build/tiny-model`` where
``build`` exists) but does not exist stops at once and says so, where vLLM would take it for
a Hugging Face repo id; everything else is vLLM's own command line, run with the hooks of
lvllm/vllm/command.py (version fallback on the CPU build, requests ended at shutdown, exit
status 1 when the engine died, quieter logs). The command exits without the interpreter's
teardown, where the bindings of Triton (imported by vLLM) print "nanobind: leaked" lines.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

from lvllm.vllm import command


def command_line() -> list[str]:
    """argv that runs this command from the running Python: the installed `vllm` script when
    it is lvllm's, else the same entry point through -m (for scripts and tests)."""
    script = Path(sys.executable).parent / "vllm"
    if script.exists() and "lvllm" in script.read_text(errors="replace"):
        return [str(script)]
    return [sys.executable, "-m", "lvllm._vllm_cli"]


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


# lvllm's subcommands, run before vLLM's parser: name -> (module with main(argv) -> status, usage).
LVLLM_COMMANDS = {
    "plan": ("lvllm.plan_command", "plan --model PATH [--gpu-memory GiB] [--ram GiB] [--max-model-len N]: "
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
    command.install_command_hooks()
    status = command.run_vllm_command()
    if isinstance(status, str):
        print(status, file=sys.stderr)
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
elif "__mp_main__" in sys.modules:
    # A process vLLM spawns from this command re-imports the command's script, and nothing
    # else of lvllm runs before vLLM logs there: its Triton messages are filtered here.
    command.quiet_triton_messages(explain=False)
    command.SpawnedFromCommand.value = True
