"""A resumed trainer's dvclive curves hold each step once (the kill matrix found them doubled)."""

from __future__ import annotations

from cantus.training import Metrics, drop_rows_from


def _rows(tsv) -> list[tuple[int, float]]:
    head, *rows = tsv.read_text().splitlines()
    col = head.split("\t").index("step")
    return [(int(r.split("\t")[col]), float(r.split("\t")[1 - col])) for r in rows]


def test_steps_logged_after_the_last_checkpoint_are_not_doubled_on_resume(tmp_path):
    killed = Metrics(tmp_path / "live", resume=False)
    for step in range(1, 6):  # steps 4 and 5 logged, then killed before their checkpoint
        killed.log(step, loss=10.0 - step)
    killed.close()
    resumed = Metrics(tmp_path / "live", resume=True)  # from the checkpoint of step 3
    for step in range(4, 7):
        resumed.log(step, loss=20.0 - step)
    resumed.close()
    rows = _rows(tmp_path / "live" / "plots" / "metrics" / "loss.tsv")
    assert rows == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 16.0), (5, 15.0), (6, 14.0)]


def test_drop_rows_from_keeps_earlier_steps_and_other_columns(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ppl.tsv").write_text("timestamp\tstep\tppl\n7\t1\t3.5\n8\t3\t2.5\n")
    (tmp_path / "lr.tsv").write_text("step\tlr\n1\t0.1\n2\t0.2\n")
    drop_rows_from(tmp_path, 2)
    assert (tmp_path / "val" / "ppl.tsv").read_text() == "timestamp\tstep\tppl\n7\t1\t3.5\n"
    assert (tmp_path / "lr.tsv").read_text() == "step\tlr\n1\t0.1\n"
    drop_rows_from(tmp_path / "nowhere", 1)  # no curves yet: nothing to do
