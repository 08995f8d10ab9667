"""The export lock: one writer per model directory; leftovers of killed runs removed."""

import pytest


def test_exclusive_lock_refuses_a_second_writer_and_cleans_leftovers(tmp_path):
    import os

    from iap_rt.errors import OutputError
    from iap_rt.fileio import exclusive_lock

    out = tmp_path / "model"
    stale = [tmp_path / ".model.k3j2x_7a", tmp_path / ".model.old-9a8b0c1d"]  # a killed export's
    for d in stale:
        (d / "sub").mkdir(parents=True)
    keep = [tmp_path / ".other.k3j2x_7a", tmp_path / "model.bak", tmp_path / ".model.b.k3j2x_7a"]
    for d in keep:
        d.mkdir()
    with exclusive_lock(out) as lock:
        assert lock.read_text() == str(os.getpid())
        assert not any(d.exists() for d in stale) and all(d.exists() for d in keep)
        with pytest.raises(OutputError) as e:  # flock is per open file: refused here too
            with exclusive_lock(out):
                pass
        assert f"pid {os.getpid()}" in str(e.value) and "model" in str(e.value)
    with exclusive_lock(out):  # released on exit
        pass
