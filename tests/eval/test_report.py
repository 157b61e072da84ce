"""The PNG report is written from a metrics history (and works for dense models and corpora without classes)."""

from __future__ import annotations

from PIL import Image

from imp_platform.eval.report import write_report


def test_report_png_has_four_panels_worth_of_pixels(tmp_path):
    history = [
        {"step": s, "loss/video_text": 3.0 / s, "loss/image_cls": 2.0 / s,
         "expert_load/video/2": [0.4, 0.3, 0.2, 0.1], "expert_load/text/2": [0.1, 0.2, 0.3, 0.4]}
        for s in (1, 2, 3)
    ]
    history[-1].update({"zeroshot_video_top1": 0.9, "zeroshot_audio_top1": 0.5, "retrieval_video_text_r1": 0.3,
                        "retrieval_video_text_r1_semantic": 0.6, "val_loss": 1.0, "num_classes": 3,
                        "zeroshot_video_confusion": [[3, 0, 0], [1, 2, 0], [0, 0, 3]]})
    out = write_report(history, tmp_path / "r" / "report.png", classes=["cat", "dog", "owl"])
    image = Image.open(out)
    assert image.size[0] > 1500 and image.size[1] > 1000
    dense = write_report([{"step": 1, "loss/vt": 1.0}], tmp_path / "dense.png")  # no eval, no classes
    assert dense.stat().st_size > 1000


def test_eval_metrics_join_the_history_row_of_their_step():
    """A checkpoint's last history row has its step: the eval's confusion must still reach the report."""
    from imp_platform.eval.run import report_points

    history = [{"step": 2, "loss/vt": 1.0}, {"step": 4, "loss/vt": 0.5, "zeroshot_video_top1": 0.2}]
    metrics = {"step": 4, "zeroshot_video_top1": 0.3, "zeroshot_video_confusion": [[1, 0], [1, 1]]}
    points = report_points(metrics, history)
    assert [p["step"] for p in points] == [2, 4] and points[-1]["loss/vt"] == 0.5
    assert points[-1]["zeroshot_video_confusion"] == [[1, 0], [1, 1]] and points[-1]["zeroshot_video_top1"] == 0.3
    assert history[-1]["zeroshot_video_top1"] == 0.2  # the checkpoint's history is left as it was
    assert [p["step"] for p in report_points({"step": 6}, history)] == [2, 4, 6]
