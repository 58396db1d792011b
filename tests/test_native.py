"""caduceus_dist.native: compile on first use, cache, concurrent builders, and every way to get None."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from caduceus_dist import native

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")

ADD_SOURCE = "int add(int a, int b) { return a + b; }\n"


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """SOURCE_DIR and the cache in tmp_path; load's memo cleared before and after."""
    sources, cache = tmp_path / "src", tmp_path / "cache"
    sources.mkdir()
    (sources / "adder.c").write_text(ADD_SOURCE)
    monkeypatch.setattr(native, "SOURCE_DIR", sources)
    monkeypatch.setenv("CADUCEUS_NATIVE_CACHE", str(cache))
    monkeypatch.delenv("CADUCEUS_NATIVE", raising=False)
    native.load.cache_clear()
    yield sources, cache
    native.load.cache_clear()


def test_builds_once_then_loads_from_the_cache(sandbox, monkeypatch):
    sources, cache = sandbox
    builds = []
    real_run = subprocess.run

    def counting_run(cmd, *args, **kwargs):
        if "-shared" in cmd:
            builds.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", counting_run)
    assert native.load("adder").add(2, 3) == 5
    assert len(builds) == 1
    assert native.load("adder") is native.load("adder")  # memoised in-process
    native.load.cache_clear()  # a new process: finds the cached library, does not compile
    assert native.load("adder").add(4, 5) == 9
    assert len(builds) == 1
    assert [p.name.startswith("adder-") and p.suffix == ".so" for p in cache.iterdir()] == [True]
    (sources / "adder.c").write_text(ADD_SOURCE + "int sub(int a, int b) { return a - b; }\n")
    native.load.cache_clear()  # an edited source is a new cache key
    assert native.load("adder").sub(7, 5) == 2
    assert len(builds) == 2


def test_concurrent_builds_from_two_processes_leave_one_valid_library(sandbox):
    sources, cache = sandbox
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from caduceus_dist import native
        native.SOURCE_DIR = Path({str(sources)!r})
        assert native.load("adder").add(20, 22) == 42
        print("ok")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0 and out.strip() == "ok", err
    assert len([p for p in cache.iterdir() if p.suffix == ".so"]) == 1
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no partial files left behind
    assert native.load("adder").add(1, 1) == 2


def test_caduceus_native_0_returns_none_without_compiling(sandbox, monkeypatch):
    _, cache = sandbox
    monkeypatch.setenv("CADUCEUS_NATIVE", "0")
    assert native.load("adder") is None
    assert not cache.exists()


def test_a_source_that_fails_to_compile_gives_none_and_a_warning_naming_the_file(sandbox, caplog):
    sources, cache = sandbox
    (sources / "broken.c").write_text("int broken(void) { return undefined_name; }\n")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.load("broken") is None
    assert str(sources / "broken.c") in caplog.text and "undefined_name" in caplog.text
    assert list(cache.iterdir()) == []  # the partial output was removed


def test_no_working_compiler_gives_none_and_a_warning(sandbox, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(sandbox[0] / "no-such-cc"))
    native._compiler.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert native.load("adder") is None
    finally:
        monkeypatch.delenv("CC")
        native._compiler.cache_clear()
    assert "no C compiler found" in caplog.text


@pytest.mark.skipif("Free Software Foundation" not in (native._compiler() or ("", ""))[1],
                    reason="the kernels use GCC pragmas; other compilers build them with warnings")
def test_the_package_kernels_compile_warning_free():
    """The shipped C sources build with the package flags plus -Wall -Wextra -Werror."""
    cc = native._compiler()[0]
    for source in sorted(native.SOURCE_DIR.glob("*.c")):
        build = subprocess.run([cc, *native.CFLAGS, "-Wall", "-Wextra", "-Werror", "-fsyntax-only", str(source)],
                               capture_output=True, text=True)
        assert build.returncode == 0, f"{source.name}: {build.stderr}"
