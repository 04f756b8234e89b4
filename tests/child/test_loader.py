"""Plugin resolution per the spec's table, each import in a fresh interpreter as the child does it."""

from __future__ import annotations

import json
import os
import py_compile
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

_RESOLVE = """
import json, sys
from liberty.jobs.child.loader import install_plugins_path, resolve_function
plugins, ref = sys.argv[1], sys.argv[2]
install_plugins_path(plugins)
try:
    func = resolve_function(ref, plugins)
except BaseException as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc), "mro": [c.__name__ for c in type(exc).__mro__]}))
else:
    print(json.dumps({"module_file": sys.modules[func.__module__].__file__, "result": func(), "path0": sys.path[0]}))
"""


def resolve(plugins: Path, ref: str) -> dict[str, Any]:
    """Resolve `ref` in a new interpreter (no module cache, like every attempt's child) and call it."""
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _RESOLVE, str(plugins), ref],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=plugins.parent,
        env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def put(plugins: Path, relpath: str, source: str) -> Path:
    path = plugins / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    path = tmp_path / "plugins"
    path.mkdir()
    return path


def test_dotted_module_path_resolves_to_the_file_in_the_package(plugins: Path) -> None:
    put(plugins, "reports/__init__.py", "")
    summary = put(plugins, "reports/summary.py", "def generate_monthly():\n    return 'summary'\n")
    got = resolve(plugins, "reports.summary:generate_monthly")
    assert got["result"] == "summary" and Path(got["module_file"]) == summary


def test_short_reference_resolves_through_the_package_init(plugins: Path) -> None:
    init = put(plugins, "housekeeping/__init__.py", "def prune_attachments():\n    return 'package'\n")
    got = resolve(plugins, "housekeeping:prune_attachments")
    assert got["result"] == "package" and Path(got["module_file"]) == init


def test_short_reference_resolves_through_a_module_file(plugins: Path) -> None:
    module = put(plugins, "housekeeping.py", "def prune_attachments():\n    return 'module'\n")
    got = resolve(plugins, "housekeeping:prune_attachments")
    assert got["result"] == "module" and Path(got["module_file"]) == module


def test_package_init_may_re_export_from_a_sibling_package(plugins: Path) -> None:
    put(plugins, "reports/__init__.py", "")
    put(plugins, "reports/housekeeping.py", "def prune_attachments():\n    return 'reexported'\n")
    put(plugins, "housekeeping/__init__.py", "from reports.housekeeping import prune_attachments\n")
    assert resolve(plugins, "housekeeping:prune_attachments")["result"] == "reexported"


def test_plugins_dir_is_first_on_sys_path(plugins: Path) -> None:
    put(plugins, "m.py", "def f():\n    return 1\n")
    assert resolve(plugins, "m:f")["path0"] == str(plugins)


def test_plugin_shadows_an_installed_module_of_the_same_name(plugins: Path) -> None:
    put(plugins, "psutil.py", "def f():\n    return 'plugin psutil'\n")
    assert resolve(plugins, "psutil:f")["result"] == "plugin psutil"


def test_missing_function_is_an_import_error_naming_it(plugins: Path) -> None:
    put(plugins, "m.py", "def f():\n    return 1\n")
    got = resolve(plugins, "m:nope")
    assert got["error"] == "ImportError"
    assert "nope" in got["message"] and "m:nope" in got["message"]


def test_non_callable_attribute_is_an_import_error(plugins: Path) -> None:
    put(plugins, "m.py", "f = 42\n")
    got = resolve(plugins, "m:f")
    assert got["error"] == "ImportError" and "int" in got["message"]


def test_missing_module_is_module_not_found_naming_the_plugins_dir(plugins: Path) -> None:
    got = resolve(plugins, "nosuch.module:f")
    assert got["error"] == "ModuleNotFoundError"
    assert "nosuch" in got["message"] and str(plugins) in got["message"]


def test_missing_submodule_is_module_not_found_naming_the_plugins_dir(plugins: Path) -> None:
    put(plugins, "reports/__init__.py", "")
    got = resolve(plugins, "reports.nosuch:f")
    assert got["error"] == "ModuleNotFoundError"
    assert "reports.nosuch" in got["message"] and str(plugins) in got["message"]


def test_missing_dependency_of_a_plugin_is_not_blamed_on_the_plugins_dir(plugins: Path) -> None:
    """`dbtools` importing an uninstalled `db` is a missing dependency, not a missing plugin module."""
    put(plugins, "dbtools.py", "import db\ndef f():\n    return 1\n")
    got = resolve(plugins, "dbtools:f")
    assert got["error"] == "ModuleNotFoundError" and "'db'" in got["message"]
    assert "in the plugins directory" not in got["message"]


def test_missing_dependency_keeps_its_own_message(plugins: Path) -> None:
    put(plugins, "steps.py", "import not_installed_dependency_xyz\ndef f():\n    return 1\n")
    got = resolve(plugins, "steps:f")
    assert got["error"] == "ModuleNotFoundError" and "not_installed_dependency_xyz" in got["message"]


def test_import_time_error_of_a_plugin_propagates_with_its_type(plugins: Path) -> None:
    put(plugins, "broken.py", "raise ValueError('bad config at import')\n")
    got = resolve(plugins, "broken:f")
    assert got["error"] == "ValueError" and "bad config at import" in got["message"]


@pytest.mark.parametrize("ref", ["m", "m:", ":f", "m.f"])
def test_malformed_reference_is_an_import_error(plugins: Path, ref: str) -> None:
    put(plugins, "m.py", "def f():\n    return 1\n")
    assert "ImportError" in resolve(plugins, ref)["mro"]


def test_edit_with_same_size_and_same_mtime_is_picked_up(plugins: Path) -> None:
    path = put(plugins, "edited.py", "def f():\n    return 111\n")
    py_compile.compile(str(path))  # a stale-able __pycache__ entry, as a previous run would leave
    assert resolve(plugins, "edited:f")["result"] == 111
    before = path.stat()
    path.write_text("def f():\n    return 222\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, int(after.st_mtime)) == (before.st_size, int(before.st_mtime))
    assert resolve(plugins, "edited:f")["result"] == 222


def test_edit_in_a_package_module_is_picked_up(plugins: Path) -> None:
    put(plugins, "pkg/__init__.py", "")
    path = put(plugins, "pkg/mod.py", "def f():\n    return 'one'\n")
    py_compile.compile(str(path))
    assert resolve(plugins, "pkg.mod:f")["result"] == "one"
    before = path.stat()
    path.write_text("def f():\n    return 'two'\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert resolve(plugins, "pkg.mod:f")["result"] == "two"


_REHEARSE = """
import json, os, sys
from liberty.jobs.child import loader
from liberty.jobs.child.loader import install_plugins_path, rehearse_import, resolve_function
plugins, scratch = sys.argv[1], sys.argv[2]
os.chdir(scratch)
install_plugins_path(plugins)
path_before, cache_before = list(sys.path), set(sys.path_importer_cache)
imported = []
real_get_code = loader._FreshSourceLoader.get_code
loader._FreshSourceLoader.get_code = lambda self, name: imported.append(name) or real_get_code(self, name)
rehearse_import(plugins)
print(json.dumps({
    "imported": list(imported),
    "scratch": os.listdir(scratch),
    "path_same": sys.path == path_before,
    "cache_new": sorted(set(sys.path_importer_cache) - cache_before - {plugins}),
    "modules": [m for m in sys.modules if "rehearsal" in m],
    "result": resolve_function("alpha:run", plugins)(),
}))
"""


def test_the_import_rehearsal_leaves_no_file_module_or_path_behind(plugins: Path, tmp_path: Path) -> None:
    put(plugins, "alpha.py", "def run():\n    return 'alpha'\n")
    scratch = tmp_path / "work"
    scratch.mkdir()
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _REHEARSE, str(plugins), str(scratch)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["imported"] == ["_nomaflow_rehearsal"]  # a whole import, through the fresh loader
    assert report["scratch"] == [] and report["path_same"] and report["cache_new"] == [] and report["modules"] == []
    assert report["result"] == "alpha"


# Every compile() after this is listed in `compiles`, by file name.
_COUNT_COMPILES = """
real_compile, compiles = builtins.compile, []
def counting_compile(source, filename, *args, **kwargs):
    compiles.append(filename)
    return real_compile(source, filename, *args, **kwargs)
builtins.compile = counting_compile
"""

_AHEAD = """
import builtins, json, pathlib, sys
import attrs
from liberty.jobs.child import loader
from liberty.jobs.child.loader import compile_ahead, install_plugins_path, resolve_function
from liberty.jobs.protocol import CompiledSource
plugins, ref, edit, known, cap = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
if cap is not None:
    loader.MAX_COMPILED_CODE = cap
install_plugins_path(plugins)
""" + _COUNT_COMPILES + """ahead = compile_ahead(plugins, ref, CompiledSource(**known) if known else None)
compiled_ahead, compiles[:] = list(compiles), []
if edit:
    pathlib.Path(edit[0]).write_text(edit[1])
func = resolve_function(ref, plugins)
print(json.dumps({
    "ahead": ahead.path if ahead else None,
    "fresh": attrs.asdict(ahead.fresh) if ahead and ahead.fresh else None,
    "compiled_ahead": compiled_ahead,
    "result": func(),
    "compiled_at_import": compiles,
}))
"""


def ahead(
    plugins: Path,
    ref: str,
    edit: tuple[Path, str] | None = None,
    known: dict[str, str] | None = None,
    cap: int | None = None,
) -> dict[str, Any]:
    """compile_ahead(ref, known), then (after an optional edit) import it, in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _AHEAD, str(plugins), ref,
         json.dumps([str(edit[0]), edit[1]] if edit else None), json.dumps(known), json.dumps(cap)],
        capture_output=True, text=True, timeout=60, cwd=plugins.parent,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_module_compiled_ahead_is_not_compiled_again_at_import(plugins: Path) -> None:
    path = put(plugins, "steps.py", "def run():\n    return 'ahead'\n")
    out = ahead(plugins, "steps:run")
    assert (out["ahead"], out["result"], out["compiled_ahead"], out["compiled_at_import"]) == (str(path), "ahead", [str(path)], [])
    assert path.exists()


def test_a_module_compiled_ahead_is_reported_with_the_digest_of_its_source(plugins: Path) -> None:
    from liberty.jobs.protocol import source_digest

    path = put(plugins, "steps.py", "def run():\n    return 'ahead'\n")
    fresh = ahead(plugins, "steps:run")["fresh"]
    assert fresh["path"] == str(path)
    assert fresh["digest"] == source_digest(path.read_bytes())
    assert fresh["code"]


def test_code_an_earlier_attempt_compiled_is_used_for_the_same_source_without_compiling(plugins: Path) -> None:
    path = put(plugins, "steps.py", "def run():\n    return 'handed over'\n")
    known = ahead(plugins, "steps:run")["fresh"]
    out = ahead(plugins, "steps:run", known=known)
    assert out["result"] == "handed over"
    assert out["compiled_ahead"] == [] and out["compiled_at_import"] == []
    assert out["ahead"] == str(path) and out["fresh"] is None  # nothing new to report


def test_code_an_earlier_attempt_compiled_is_not_used_once_the_source_is_edited(plugins: Path) -> None:
    path = put(plugins, "steps.py", "def run():\n    return 'old'\n")
    known = ahead(plugins, "steps:run")["fresh"]
    path.write_text("def run():\n    return 'new'\n")  # same length, same second
    out = ahead(plugins, "steps:run", known=known)
    assert out["result"] == "new"
    assert out["compiled_ahead"] == [str(path)]
    assert out["fresh"]["digest"] != known["digest"]


def test_code_handed_over_for_another_path_is_not_used(plugins: Path) -> None:
    put(plugins, "steps.py", "def run():\n    return 'steps'\n")
    other = put(plugins, "other.py", "def run():\n    return 'steps'\n")  # the same bytes, elsewhere
    known = ahead(plugins, "other:run")["fresh"]
    out = ahead(plugins, "steps:run", known=known)
    assert out["compiled_ahead"] == [str(plugins / "steps.py")]
    assert known["path"] == str(other)


def test_code_handed_over_that_is_not_a_code_object_is_compiled_instead(plugins: Path) -> None:
    import base64
    import marshal

    path = put(plugins, "steps.py", "def run():\n    return 'compiled'\n")
    known = ahead(plugins, "steps:run")["fresh"]
    for code in ("not base64!", base64.b64encode(b"\x00garbage").decode(), base64.b64encode(marshal.dumps(42)).decode()):
        out = ahead(plugins, "steps:run", known={**known, "code": code})
        assert out["result"] == "compiled"
        assert out["compiled_ahead"] == [str(path)]


def test_a_module_whose_code_is_over_the_cap_is_compiled_but_not_reported(plugins: Path) -> None:
    put(plugins, "steps.py", "def run():\n    return 'big'\n")
    out = ahead(plugins, "steps:run", cap=10)
    assert out["result"] == "big" and out["compiled_at_import"] == []
    assert out["fresh"] is None


def test_an_edit_after_compiling_ahead_is_what_runs(plugins: Path) -> None:
    path = put(plugins, "steps.py", "def run():\n    return 'old'\n")
    out = ahead(plugins, "steps:run", edit=(path, "def run():\n    return 'new'\n"))  # same length, same second
    assert out["result"] == "new"
    assert out["compiled_at_import"] == [str(path)]


def test_a_module_in_a_package_is_compiled_ahead_without_importing_the_package(plugins: Path) -> None:
    put(plugins, "reports/__init__.py", "raise RuntimeError('the package ran')\n")
    put(plugins, "reports/summary.py", "def generate_monthly():\n    return 'summary'\n")
    proc = subprocess.run(
        [sys.executable, "-P", "-c",
         "import sys; from liberty.jobs.child.loader import compile_ahead; "
         "print(compile_ahead(sys.argv[1], 'reports.summary:generate_monthly').path); print('reports' in sys.modules)",
         str(plugins)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(plugins / "reports" / "summary.py"), "False"]


@pytest.mark.parametrize(
    "ref, files",
    [
        ("missing:run", {}),
        ("broken:run", {"broken.py": "def run(:\n"}),
        ("pkg:run", {"pkg/__init__.py": "def run():\n    return 1\n"}),
        ("..up:run", {}),
        ("not a module:run", {}),
        ("a/b:run", {"a/b.py": "def run():\n    return 1\n"}),
    ],
)
def test_compile_ahead_does_nothing_where_there_is_nothing_safe_to_compile(plugins: Path, ref: str, files: dict[str, str]) -> None:
    for relpath, source in files.items():
        put(plugins, relpath, source)
    proc = subprocess.run(
        [sys.executable, "-P", "-c",
         "import sys; from liberty.jobs.child.loader import compile_ahead, _compiled_ahead; "
         "print(compile_ahead(sys.argv[1], sys.argv[2]), len(_compiled_ahead))",
         str(plugins), ref],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "0"]


_KEPT = """
import builtins, json, pathlib, sys
from liberty.jobs.child.loader import install_plugins_path, keep_compiled, resolve_function
plugins, path, edit = sys.argv[1], sys.argv[2], sys.argv[3]
keep_compiled(path)
install_plugins_path(plugins)
""" + _COUNT_COMPILES + """first = resolve_function("kept:run", plugins)()
del sys.modules["kept"]
second = resolve_function("kept:run", plugins)()
del sys.modules["kept"]
quiet = list(compiles)
pathlib.Path(path).write_text(edit)
edited = resolve_function("kept:run", plugins)()
print(json.dumps({"results": [first, second, edited], "compiled_while_unchanged": quiet, "compiled_after_edit": compiles[len(quiet):]}))
"""


def test_a_module_kept_compiled_is_imported_again_and_again_without_compiling_until_edited(plugins: Path) -> None:
    path = put(plugins, "kept.py", "def run():\n    return 'old'\n")
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _KEPT, str(plugins), str(path), "def run():\n    return 'new'\n"],
        capture_output=True, text=True, timeout=60, cwd=plugins.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "results": ["old", "old", "new"],
        "compiled_while_unchanged": [],
        "compiled_after_edit": [str(path)],
    }
