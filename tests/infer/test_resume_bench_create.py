"""A run killed while it creates its output (found while building benchmarks/resume.py): the
half-made folder is the run's own, so the rerun starts it afresh instead of refusing it as a
foreign folder."""

import numpy as np
import pytest

from genselfdiff.io import omezarr


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, what is on disk stays."""


def test_a_run_killed_while_creating_its_output_is_started_afresh(tmp_path, monkeypatch):
    import zarr

    path, run = tmp_path / "out.ome.zarr", {"model": "m", "tile": 64}
    kw = dict(shape=(300, 200), chunk=128, levels=2, run=run)
    create_array = zarr.Group.create_array
    calls = []

    def dies_on_the_second_array(self, *a, **k):
        calls.append(a)
        if len(calls) == 2:
            raise Killed
        return create_array(self, *a, **k)

    monkeypatch.setattr(zarr.Group, "create_array", dies_on_the_second_array)
    with pytest.raises(Killed):
        omezarr.LabelImage.create(path, **kw)
    monkeypatch.undo()
    assert (path / "zarr.json").exists() and not (path / "1").exists()

    image = omezarr.LabelImage.create(path, **kw)  # the rerun
    labels = np.arange(128 * 128, dtype=np.uint8).reshape(128, 128)
    image.write((0, 0), labels)
    assert image.done() == {(0, 0)}
    assert (np.asarray(zarr.open_array(path / "1", mode="r")[:64, :64]) == labels[::2, ::2]).all()
    # A folder that is not ours is still refused.
    foreign = tmp_path / "foreign.ome.zarr"
    zarr.open_group(foreign, mode="w", zarr_format=3)
    with pytest.raises(omezarr.UserError, match="not a genselfdiff output"):
        omezarr.LabelImage.create(foreign, **kw)
