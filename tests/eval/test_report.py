"""The PNG report is written from a metrics history (and works for dense models too)."""

from __future__ import annotations

from PIL import Image

from imp_platform.eval.report import write_report


def test_report_png_has_three_panels_worth_of_pixels(tmp_path):
    history = [
        {"step": s, "loss/video_text": 3.0 / s, "loss/image_cls": 2.0 / s,
         "expert_load/video/2": [0.4, 0.3, 0.2, 0.1], "expert_load/text/2": [0.1, 0.2, 0.3, 0.4]}
        for s in (1, 2, 3)
    ]
    history[-1].update({"zeroshot_video_top1": 0.9, "zeroshot_audio_top1": 0.5, "retrieval_video_text_r1": 0.3,
                        "val_loss": 1.0})
    out = write_report(history, tmp_path / "r" / "report.png")
    image = Image.open(out)
    assert image.size[0] > 1000 and image.size[1] > 300
    dense = write_report([{"step": 1, "loss/vt": 1.0}], tmp_path / "dense.png")
    assert dense.stat().st_size > 1000
