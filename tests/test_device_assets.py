"""benchmarks/device_assets.py: the assets and wheels that a lent GPU machine lacks travel in
chunks and come back byte for byte, packages under the site folder, Debian files at their paths."""

import json
import zipfile

import numpy as np
import pytest
from helpers import load_benchmark_module

assets = load_benchmark_module("device_assets")


@pytest.fixture
def fake_assets(tmp_path, monkeypatch):
    """A package (two files and a __pycache__ that must not travel), a Debian-style file, and a
    pure-Python wheel in place of pip's download."""
    package = tmp_path / "installed" / "fakepkg"
    (package / "model").mkdir(parents=True)
    (package / "__pycache__").mkdir()
    (package / "__init__.py").write_text("MODEL = 'model'\n")
    # 1 MB that gzip cannot shrink: several chunks
    (package / "model" / "weights.bin").write_bytes(np.random.default_rng(0).bytes(1_000_000))
    (package / "__pycache__" / "x.pyc").write_bytes(b"stale")
    debian = tmp_path / "usr" / "share" / "fake" / "data.txt"
    debian.parent.mkdir(parents=True)
    debian.write_text("line\n" * 100)
    wheel = tmp_path / "wheels" / "tinywheel-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tinywheel/__init__.py", "VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path / "installed"))
    monkeypatch.setitem(assets.ASSETS, "fake_setting", (("package", "fakepkg", None), ("path", str(debian), None)))
    monkeypatch.setattr(assets, "download_wheels",
                        lambda requirements, version, folder: [wheel] if requirements else [])
    return package, debian


def test_pack_then_unpack_gives_the_same_files(tmp_path, fake_assets):
    package, debian = fake_assets
    folder = tmp_path / "carry"
    manifest = assets.pack(["fake_setting"], folder, chunk_mb=0.3, wheels=("tinywheel==1.0",))
    assert len(manifest["parts"]) >= 2 and json.loads((folder / "manifest.json").read_text()) == manifest
    # The same files pack to the same chunks (each call can re-send any of them).
    first = (folder / "part00").read_bytes()
    assert assets.pack(["fake_setting"], folder, chunk_mb=0.3, wheels=("tinywheel==1.0",)) == manifest
    assert (folder / "part00").read_bytes() == first

    site, root = tmp_path / "site", tmp_path / "root"
    written = assets.unpack(folder, site, root)
    assert (site / "fakepkg" / "model" / "weights.bin").read_bytes() == (package / "model" / "weights.bin").read_bytes()
    assert (site / "fakepkg" / "__init__.py").read_text() == "MODEL = 'model'\n"
    assert not (site / "fakepkg" / "__pycache__").exists()
    assert (root / debian.relative_to("/")).read_text() == debian.read_text()
    assert (site / "tinywheel" / "__init__.py").read_text() == "VALUE = 7\n"  # the wheel, installed
    assert len(written) == 4


def test_a_missing_or_altered_chunk_is_refused(tmp_path, fake_assets):
    folder = tmp_path / "carry"
    manifest = assets.pack(["fake_setting"], folder, chunk_mb=0.3, wheels=())
    last = folder / manifest["parts"][-1]
    data = last.read_bytes()
    last.unlink()
    with pytest.raises(SystemExit, match=r"chunks \['part0\d'\] have not arrived"):
        assets.unpack(folder, tmp_path / "site", tmp_path / "root")
    last.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(SystemExit, match="SHA-256 differs"):
        assets.unpack(folder, tmp_path / "site", tmp_path / "root")


def test_every_benchmark_setting_names_its_assets_and_unknown_ones_are_refused():
    from celora_jax.federated.presets import BENCHMARKS

    gated = set(BENCHMARKS) - {"shakespeare_natural"}  # the decoder setting has its own GPU plan
    assert gated <= set(assets.ASSETS)
    with pytest.raises(SystemExit, match="unknown settings"):
        assets.members(["no_such_setting"])
