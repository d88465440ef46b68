"""Every Python process lb starts runs lb's own code, never the current directory's.

`python -m workers` would put the current directory first on sys.path: started
from a folder holding a `workers/`, `inference/` or `lb/` package, every child
would import that code, and started from a source checkout next to an
installed lb, the children would run the uncompiled checkout (no C fast path,
the checkout's model) while the supervisor runs the installed package.

So a child is started as `python -P .../lb/core/boot.py MODULE ARGS...`
(`python_argv`), which runs `python -m MODULE ARGS...` after taking the
packages lb ships together (lb, workers, inference) from the directory this
`lb` package was imported from: the starting process and everything it starts
run the same code, whatever the current directory or sys.path hold.  `-P`
keeps the current directory (and this file's own directory) off sys.path for
everything else the child imports.  This module uses the standard library only:
it runs before any of lb is imported.
"""

from __future__ import annotations

import os
import sys

# lb, workers and inference are installed side by side (pyproject.toml: packages).
PACKAGES = ("lb", "workers", "inference")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (lb/core/boot.py)
EXIT_CANNOT_BOOT = 3  # lb/supervisor/children.py: "could not boot"


def python_argv(module: str) -> list[str]:
    """The argv that runs `python -m module` with this process's own lb packages."""
    return [sys.executable, "-P", os.path.join(ROOT, "lb", "core", "boot.py"), module]


def pin_packages(root: str) -> None:
    """Import lb's top-level packages from `root`, whatever sys.path says; their
    submodules then come from there too (a package's __path__ decides)."""
    import importlib.util
    from importlib.machinery import PathFinder

    specs = []
    for name in PACKAGES:
        spec = PathFinder.find_spec(name, [root])
        if spec is None or spec.loader is None:
            print(f"lb: package {name!r} not found in {root}", file=sys.stderr)
            raise SystemExit(EXIT_CANNOT_BOOT)
        specs.append(spec)
    # All registered before any runs: one package's __init__ importing another
    # then finds it here, not on sys.path.
    modules = [importlib.util.module_from_spec(spec) for spec in specs]
    for spec, module in zip(specs, modules):
        sys.modules[spec.name] = module
    for spec, module in zip(specs, modules):
        spec.loader.exec_module(module)


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -P lb/core/boot.py MODULE [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    module = sys.argv[1]
    del sys.argv[1]
    pin_packages(ROOT)
    import runpy

    # As `python -m module`: sys.argv[0] becomes the module's file.
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
