"""The runtime package was renamed relaxsgd.distributed; relaxsgd.dist stays one release."""

from __future__ import annotations

import subprocess
import sys
import warnings


def test_old_names_are_the_new_objects_with_a_warning() -> None:
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as got:\n"
        "    warnings.simplefilter('always')\n"
        "    import relaxsgd.dist as old\n"
        "    from relaxsgd.dist.wire import decode\n"
        "    from relaxsgd.dist.launch import LocalJob\n"
        "import relaxsgd.distributed as new\n"
        "from relaxsgd.distributed import launch, wire\n"
        "assert decode is wire.decode and LocalJob is launch.LocalJob\n"
        "assert old.wrap is new.wrap\n"
        "assert any(issubclass(w.category, DeprecationWarning) and 'distributed' in "
        "str(w.message) for w in got), got\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_old_launcher_module_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "relaxsgd.dist.launch", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "-n NPROC" in out.stdout, out.stderr


def test_new_package_imports_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import relaxsgd.distributed.runtime  # noqa: F401


def test_test_harness_is_not_shipped() -> None:
    import importlib.util

    assert importlib.util.find_spec("relaxsgd.distributed.testing") is None
