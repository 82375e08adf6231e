"""Wheel build hook: compile the sans-IO tunnel core (``overlay_httpx/_protocol``) with mypyc.

The same typed Python source, compiled to C, runs the per-packet path (frames,
ACKs, recovery, congestion control, streams) about 2.5 times faster; see
docs/PERFORMANCE.md. The source stays the truth and is shipped beside the
extension modules, so a wheel built without a compiler is simply pure Python.

* Editable installs (``pip install -e .``, the development set-up) are never
  compiled: an extension module would shadow the source being edited.
* ``OVERLAY_HTTPX_PURE=1`` builds a pure-Python wheel on purpose.
* When compilation fails (no C compiler, no Python headers) the wheel is built
  pure and a warning says why (pip shows it with ``-v``), unless
  ``OVERLAY_HTTPX_COMPILE=require``, which makes the failure fatal (CI uses it,
  so a broken compile cannot pass unseen).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: the package compiled; everything else (asyncio/trio code, the CLI) stays Python
COMPILED_PACKAGE = "overlay_httpx/_protocol"
#: modules of it that stay Python: the snapshot and settings dataclasses users hold
#: (`TunnelStatistics`, `EndpointStatistics`, `TunnelConfig`), which must pickle,
#: copy and accept what a pure dataclass accepts; mypyc's frozen classes do not
NOT_COMPILED = frozenset({"_config.py", "_stats.py"})


class MypycBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"
    _work: Path | None = None  # the compiler's scratch directory, removed in finalize

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        if os.environ.get("OVERLAY_HTTPX_PURE", "") not in ("", "0"):
            self.app.display_info("overlay_httpx: OVERLAY_HTTPX_PURE is set, building pure Python")
            return
        try:
            built = self._compile()
        except (Exception, SystemExit) as exc:  # mypyc exits on a type error: fall back too
            self._clean()
            if os.environ.get("OVERLAY_HTTPX_COMPILE") == "require":
                raise
            self.app.display_warning(
                f"overlay_httpx: compiling {COMPILED_PACKAGE} with mypyc failed "
                f"({type(exc).__name__}: {exc}); building a pure-Python wheel, which is "
                "correct but slower"
            )
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        build_data["force_include"].update(built)

    def _compile(self) -> dict[str, str]:
        """Build the extension modules into a temporary directory; map them to wheel paths."""
        from mypyc.build import mypycify
        from setuptools import Distribution

        root = Path(self.root)
        sources = sorted(
            p.relative_to(root).as_posix()
            for p in (root / COMPILED_PACKAGE).glob("*.py")
            if p.name not in NOT_COMPILED
        )
        work = self._work = Path(tempfile.mkdtemp(prefix="overlay_httpx_mypyc_"))
        cwd = os.getcwd()
        os.chdir(root)  # mypycify names modules by their path relative to the project
        try:
            # The type check sees the runtime dependencies (the hook requires them, see
            # pyproject.toml), reports only on the modules compiled (the others may use
            # development-only packages such as trio) and keeps its cache out of the tree.
            options = ["--strict", "--follow-imports=silent", "--cache-dir", str(work / "mypy")]
            extensions = mypycify(
                [*sources, *options], opt_level="3", multi_file=True, target_dir=str(work / "c")
            )
            dist = Distribution({"name": "overlay_httpx", "ext_modules": extensions})
            command = dist.get_command_obj("build_ext")
            command.build_lib = str(work / "lib")
            command.build_temp = str(work / "tmp")
            command.parallel = os.cpu_count() or 1
            command.ensure_finalized()
            command.run()
        finally:
            os.chdir(cwd)
        lib = work / "lib"
        built = {
            str(path): path.relative_to(lib).as_posix() for path in lib.rglob("*") if path.is_file()
        }
        if not any(name.startswith(COMPILED_PACKAGE) for name in built.values()):
            raise RuntimeError("mypyc produced no extension module")
        print(f"overlay_httpx: compiled {len(built)} modules with mypyc", file=sys.stderr)
        return built

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        self._clean()  # the wheel holds copies of the extensions by now

    def _clean(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
