"""fipray.report's plots write PNGs."""

from __future__ import annotations

import pytest

from fipray.report import plot_task_pair

PNG = b"\x89PNG\r\n\x1a\n"


def _records() -> list[dict]:
    # a 2-task path: task 0 accuracy held near 0.97 while task 1 rises; the first row is task 0's base
    rows = [{"phase": "task1", "step": 10 * k, "acc_task0": 0.97 - 0.01 * k, "acc_task1": 0.1 + 0.08 * k}
            for k in range(11)]
    return [{"phase": "base", "step": 0, "acc_task0": 0.98}] + rows  # a row without acc_task1 is skipped


def test_plot_task_pair_writes_a_png(tmp_path):
    out = tmp_path / "pair.png"
    plot_task_pair(_records(), out, ("MNIST", "Fashion-MNIST"), title="FIP: MNIST then Fashion",
                   others={"naive": (0.2, 0.9), "er": (0.7, 0.88), "derpp": (0.8, 0.87), "joint": (0.97, 0.9)})
    data = out.read_bytes()
    assert data.startswith(PNG)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (495, 440)  # 4.5 x 4 in at 110 dpi: a small figure


def test_plot_task_pair_without_others_or_title(tmp_path):
    out = tmp_path / "sub" / "pair.png"
    out.parent.mkdir()
    plot_task_pair(_records(), out, ("task A", "task B"))
    assert out.read_bytes().startswith(PNG)


@pytest.mark.parametrize("records", [[], [{"phase": "base", "step": 0, "acc_task0": 0.9}]])
def test_plot_task_pair_with_nothing_to_draw_writes_nothing(tmp_path, records):
    out = tmp_path / "pair.png"
    plot_task_pair(records, out, ("a", "b"))
    assert not out.exists()
