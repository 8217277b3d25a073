"""megamoe.atomic: the one atomic single-file writer every output path uses."""
import os
import stat

import pytest
import torch

from megamoe.atomic import atomic_savefig, atomic_torch_save, atomic_write, atomic_write_text


def test_text_round_trip_creates_parent_and_replaces(tmp_path):
    path = tmp_path / "a" / "b.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == ["b.txt"]


def test_failed_write_keeps_old_content_leaves_no_temp_and_reraises(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_mode_follows_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "m.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_executable_file_gets_execute_bits_the_umask_allows(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "job.sbatch", "#!/bin/bash\n", executable=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o750


def test_torch_save_and_savefig(tmp_path):
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "s.pt")
    assert torch.equal(torch.load(tmp_path / "s.pt")["w"], torch.arange(3))
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    atomic_savefig(fig, tmp_path / "p.png")
    plt.close(fig)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
