"""The ffcv compat module: an ffcv other than the tested version fails on import, naming itself and the file."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest

pytest.importorskip("ffcv")

from pipeline.load import ffcv_compat  # noqa: E402


def test_installed_version_is_a_tested_one():
    ffcv_compat.check_ffcv_version(ffcv_compat.installed_version())  # the import above ran the same check


@pytest.mark.parametrize("version", ["1.0.3", "1.1.0", "0.0.3rc1"])
def test_unsupported_version_is_a_clear_error(version):
    with pytest.raises(ffcv_compat.FFCVVersionError) as err:
        ffcv_compat.check_ffcv_version(version)
    msg = str(err.value)
    assert f"ffcv {version} is installed" in msg and "pipeline/load/ffcv_compat.py" in msg
    assert all(v in msg for v in ffcv_compat.TESTED_VERSIONS) and "TESTED_VERSIONS" in msg


def test_import_fails_before_touching_ffcv_internals(monkeypatch):
    """A fresh copy of the module, with the installed distribution reporting another version, refuses to load."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9" if name == "ffcv" else real(name))
    spec = importlib.util.spec_from_file_location("ffcv_compat_copy", ffcv_compat.__file__)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(RuntimeError, match=r"ffcv 9\.9\.9 is installed.*ffcv==1\.0\.2") as err:
        spec.loader.exec_module(module)
    assert type(err.value).__name__ == "FFCVVersionError"  # the copy's own class
    assert not hasattr(module, "memcpy_c")  # stopped before binding any private C function
