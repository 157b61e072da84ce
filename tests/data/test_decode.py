"""Decode ops on real encoded media, the PyAV fallback, and every error kind on a planted fault."""

from __future__ import annotations

import io
import json
import pickle
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from media import (VIDEO_FORMATS, encode_audio, encode_video, frame_indices, image_bytes, level_frame,
                   tone, wav_bytes, wav_header)
from PIL import Image

from imp_platform.config.pipeline import AudioConfig, LimitsConfig, load_pipeline
from imp_platform.data import decode
from imp_platform.data.synth import DTMF_HZ, build_tokenizer, dtmf, make_sample



def dominant_pair(mel_or_wave: np.ndarray, rate: int) -> tuple[float, float]:
    spectrum = np.abs(np.fft.rfft(mel_or_wave))
    freqs = np.fft.rfftfreq(mel_or_wave.size, 1 / rate)
    low = (freqs > 600) & (freqs < 1000)
    high = (freqs > 1150) & (freqs < 1550)
    return freqs[low][spectrum[low].argmax()], freqs[high][spectrum[high].argmax()]


@pytest.fixture(scope="module")
def cfg():
    return load_pipeline()


@pytest.fixture(scope="module")
def sample() -> dict[str, object]:
    """A real synth sample as a webdataset row (``__key__`` + extension -> bytes)."""
    members = make_sample(3, "train", 5)
    row: dict[str, object] = {"__key__": "train-000005"}
    row.update({name.split(".", 1)[1]: data for name, data in members.items()})
    return row


# ---------------------------------------------------------------- video


def test_probe_and_decode_h264_resizes_and_samples_the_centre(cfg) -> None:
    data = encode_video(80, 48, frames=24, fps=12)
    info = decode.probe_video(data)
    assert (info.width, info.height, info.fps, info.num_frames, info.codec) == (80, 48, 12.0, 24, "h264")
    assert info.duration_s == pytest.approx(2.0)
    clip = decode.decode_video(data, (4, 32, 56), fps=6.0, info=info)
    assert clip.shape == (4, 32, 56, 3) and clip.dtype == np.uint8
    # 4 frames at 6 fps from a 12 fps, 24-frame video: every 2nd frame of the centred 8-frame window.
    assert frame_indices(clip) == [8, 10, 12, 14]


@pytest.mark.parametrize("ext", sorted(VIDEO_FORMATS))
def test_every_container_and_codec_decodes_the_sampled_frames(ext: str) -> None:
    """H.264 mp4, VP9 webm, VP8 mkv, MPEG-4 avi, MJPEG mov at an odd size: the right frames, resized."""
    data = encode_video(66, 38, frames=12, fps=12, ext=ext)
    info = decode.probe_video(data)
    assert (info.width, info.height, info.num_frames) == (66, 38, 12)
    clip = decode.decode_video(data, (4, 32, 56), fps=None, info=info)
    assert clip.shape == (4, 32, 56, 3) and frame_indices(clip) == [0, 4, 7, 11]


def test_av1_decodes_where_ffmpeg_has_the_codec() -> None:
    import av

    try:
        av.codec.Codec("libsvtav1", "w")
    except av.FFmpegError:
        pytest.skip("this FFmpeg build has no AV1 encoder")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libsvtav1", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(level_frame(64, 64)(i), format="rgb24")))
        container.mux(stream.encode())
    clip = decode.decode_video(buf.getvalue(), (2, 32, 32), fps=None)
    assert decode.probe_video(buf.getvalue()).codec in ("av1", "libdav1d") and clip.shape == (2, 32, 32, 3)
    assert abs(frame_indices(clip)[1] - 7) <= 1


def test_a_video_without_frame_count_decodes_at_most_the_cap() -> None:
    """A raw H.264 stream has no duration nor frame count: only the first frames up to the cap are sampled."""
    data = encode_video(32, 32, frames=20, fps=10, fmt="h264")
    info = decode.probe_video(data)
    assert info.num_frames == 0 and info.duration_s == 0
    clip = decode._decode_pyav(data, (3, 32, 32), None, info, max_frames=9)
    assert frame_indices(clip) == [0, 4, 8]  # spread over the first 9 frames, frames 9-19 never decoded


def test_a_truncated_video_keeps_the_real_frames_it_yields() -> None:
    """The documented rule: a cut-off webm that still yields decoded frames is kept, its clip clamped to them."""
    data = encode_video(64, 64, frames=24, fps=12, ext="webm")
    cut = data[: int(len(data) * 0.6)]
    clip = decode.decode_video(cut, (4, 32, 32), fps=None)
    indices = frame_indices(clip)
    assert indices == sorted(indices) and indices[0] == 0 and indices[-1] < 23  # real frames, not the missing tail


def test_sample_indices_clamp_short_videos() -> None:
    assert decode.sample_indices(30, 30.0, 4, 10.0).tolist() == [9, 12, 15, 18]
    assert decode.sample_indices(3, 10.0, 5, 10.0).tolist() == [0, 1, 2, 2, 2]
    assert decode.sample_indices(10, 0.0, 3, None).tolist() == [0, 4, 9]


def test_pyav_fallback_for_a_container_decord_rejects() -> None:
    import decord

    data = encode_video(64, 48, frames=12, fps=12, fmt="h264")  # a raw elementary stream, no container
    with pytest.raises(decord.DECORDError):
        decord.VideoReader(io.BytesIO(data))
    clip = decode.decode_video(data, (4, 32, 32), fps=None)
    assert clip.shape == (4, 32, 32, 3)
    assert frame_indices(clip) == [0, 4, 7, 11]


def test_pyav_fallback_matches_decord_where_both_work() -> None:
    data = encode_video(64, 64, frames=12, fps=12)
    info = decode.probe_video(data)
    via_decord = decode._decode_decord(data, (3, 32, 32), None, 1)
    via_pyav = decode._decode_pyav(data, (3, 32, 32), None, info)
    assert np.abs(via_decord.astype(int) - via_pyav.astype(int)).mean() < 4


def test_pyav_repeats_the_last_frame_of_short_videos() -> None:
    data = encode_video(64, 64, frames=3, fps=10)
    clip = decode._decode_pyav(data, (5, 32, 32), 10.0, decode.probe_video(data))
    assert frame_indices(clip) == [0, 1, 2, 2, 2]


def test_video_errors() -> None:
    good = encode_video(64, 48)
    with pytest.raises(decode.CorruptVideo) as err:
        decode.probe_video(good[: len(good) // 2])  # truncated: the moov atom is at the end
    assert err.value.kind == "corrupt_video"
    with pytest.raises(decode.CorruptVideo):
        decode.probe_video(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(decode.UnknownCodec) as err:
        decode.probe_video(good.replace(b"avc1", b"zzzz"))
    assert err.value.kind == "unknown_codec"
    with pytest.raises(decode.AbsurdResolution, match="16384x16"):
        decode.probe_video(encode_video(16384, 16, frames=1))
    with pytest.raises(decode.AbsurdDuration):
        decode.probe_video(good, LimitsConfig(max_duration_s=0.5))


# ---------------------------------------------------------------- audio


@pytest.mark.parametrize(("rate", "channels", "fmt"), [(8000, 1, "WAV"), (44100, 2, "FLAC"), (22050, 1, "OGG")])
def test_soundfile_audio_to_mel(rate: int, channels: int, fmt: str) -> None:
    wave = dtmf(4, 1.5, rate, channels, np.random.default_rng(1))
    subtype = "VORBIS" if fmt == "OGG" else "PCM_16"
    clip = decode.decode_audio(wav_bytes(wave, rate, fmt, subtype), fmt.lower())
    mono = clip.wave
    assert clip.rate == rate and mono.shape == (int(1.5 * rate),) and clip.duration_s == pytest.approx(1.5)
    audio = AudioConfig(hop_length=125, waveform=True)
    feats = decode.audio_features(mono, rate, audio, 2.0)
    assert feats["audio_mel"].shape == (256, 128) and feats["audio_mel"].dtype == np.float32
    assert feats["audio_wave"].shape == (32000,)
    assert np.isfinite(feats["audio_mel"]).all()
    # resampled to 16 kHz, the DTMF pair of "4" is still where it should be; the tail is zero padding
    low, high = dominant_pair(feats["audio_wave"][:24000], 16000)
    assert abs(low - DTMF_HZ[4][0]) < 15 and abs(high - DTMF_HZ[4][1]) < 20
    assert not feats["audio_wave"][24100:].any()


@pytest.mark.parametrize(("ext", "rate"), [("mp3", 22050), ("m4a", 22050), ("opus", 48000)])
def test_pyav_audio(ext: str, rate: int) -> None:
    wave = dtmf(9, 1.0, rate, 1, np.random.default_rng(2))[:, 0]
    clip = decode.decode_audio(encode_audio(wave, rate, ext), ext)
    mono = clip.wave
    assert clip.rate == rate and 0.9 * rate < mono.size < 1.2 * rate
    low, high = dominant_pair(mono, rate)
    assert abs(low - DTMF_HZ[9][0]) < 15 and abs(high - DTMF_HZ[9][1]) < 20


def test_audio_from_a_video_track() -> None:
    wave = dtmf(7, 1.0, 16000, 1, np.random.default_rng(0))[:, 0]
    clip = decode.decode_audio(encode_video(64, 48, frames=12, fps=12, audio_rate=16000, wave=wave), "mp4")
    mono, rate = clip.wave, clip.rate
    assert rate == 16000 and mono.size > 0.9 * 16000
    low, high = dominant_pair(mono, rate)
    assert abs(low - DTMF_HZ[7][0]) < 15 and abs(high - DTMF_HZ[7][1]) < 20


def test_only_the_kept_window_of_long_audio_is_decoded() -> None:
    """A 30 s recording, 2 s kept: the decoder returns the centred 2 s and the whole duration, via soundfile and PyAV."""
    rate = 16000
    wave = np.concatenate([tone(300, 14.0, rate), tone(1000, 2.0, rate), tone(300, 14.0, rate)])
    for ext in ("flac", "mp3"):
        clip = decode.decode_audio(encode_audio(wave, rate, ext), ext, max_seconds=2.0)
        assert clip.duration_s == pytest.approx(30.0, abs=0.1)
        assert 1.9 * rate <= clip.wave.size <= 2.0 * rate + 1, ext
        spectrum = np.abs(np.fft.rfft(clip.wave))
        assert abs(np.fft.rfftfreq(clip.wave.size, 1 / rate)[spectrum.argmax()] - 1000) < 20, ext  # the centre, not the start


@pytest.mark.parametrize(("rate", "channels"), [(2_000_000_000, 1), (16000, 1000)])
def test_absurd_audio_headers_are_refused_before_decoding(rate: int, channels: int) -> None:
    with pytest.raises(decode.AbsurdAudio) as err:
        decode.decode_audio(wav_header(rate, channels), "wav")
    assert err.value.kind == "absurd_audio"


def test_audio_errors() -> None:
    with pytest.raises(decode.EmptyAudio) as err:
        decode.decode_audio(b"", "wav")
    assert err.value.kind == "empty_audio"
    with pytest.raises(decode.EmptyAudio):
        decode.decode_audio(wav_bytes(np.zeros((0, 1), np.float32), 16000), "wav")
    nan_wave = np.full((800, 1), np.nan, dtype=np.float32)
    with pytest.raises(decode.NanAudio) as err:
        decode.decode_audio(wav_bytes(nan_wave, 8000, subtype="FLOAT"), "wav")
    assert err.value.kind == "nan_audio"
    with pytest.raises(decode.CorruptAudio):
        decode.decode_audio(b"RIFF....WAVEnot really", "wav")
    with pytest.raises(decode.CorruptAudio):
        decode.decode_audio(b"\xff\xfb" + bytes(64), "mp3")
    with pytest.raises(decode.EmptyAudio, match="no audio track"):
        decode.decode_audio(encode_video(64, 48), "mp4")
    with pytest.raises(decode.AbsurdDuration):
        decode.decode_audio(wav_bytes(np.zeros((16000, 1), np.float32), 8000), "wav", LimitsConfig(max_duration_s=1.5))
    with pytest.raises(decode.NanAudio):
        decode.audio_features(np.array([0.1, np.inf], np.float32), 16000, AudioConfig(), 1.0)


# ---------------------------------------------------------------- text and images


def test_text_and_tokenizer(tmp_path) -> None:
    note = decode.decode_text(json.dumps({"caption": " the digit seven moves up ", "label": 7}).encode(), "json")
    assert note.caption == "the digit seven moves up" and note.fields["label"] == 7
    assert decode.decode_text("a plain caption\n".encode(), "txt") == decode.Annotation(["a plain caption"], {})
    path = tmp_path / "tokenizer.json"
    build_tokenizer().save(str(path))
    tokenizer = decode.load_tokenizer(str(path))
    assert decode.load_tokenizer(path.read_text()).get_vocab() == tokenizer.get_vocab()
    ids, mask = decode.tokenize("The digit SEVEN moves up", tokenizer, 8)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert mask.tolist() == [True] * 5 + [False] * 3 and ids[5:].tolist() == [0, 0, 0]
    assert 1 not in ids.tolist()  # no [UNK]: the vocabulary covers captions
    ids, mask = decode.tokenize("one two three four five six", tokenizer, 4)
    assert mask.all() and ids.shape == (4,)


def test_text_errors() -> None:
    with pytest.raises(decode.BadTextEncoding) as err:
        decode.decode_text("caf\u00e9".encode("latin-1"), "txt")
    assert err.value.kind == "bad_text_encoding"
    with pytest.raises(decode.CorruptText):
        decode.decode_text(b"{not json", "json")
    with pytest.raises(decode.CorruptText, match="caption"):
        decode.decode_text(b'{"label": 3}', "json")
    with pytest.raises(decode.CorruptText, match="list of strings"):
        decode.decode_text(b'{"caption": ["a", 3]}', "json")


def test_caption_lists_and_metadata() -> None:
    note = decode.decode_text(json.dumps({"caption": ["", " a red disc ", "a disc"], "label": "red", "fps": 8}), "json")
    assert note.caption == "a red disc"
    assert json.loads(decode.metadata(note, "caption", "label")) == {"fps": 8, "captions": ["a red disc", "a disc"]}
    assert json.loads(decode.metadata(decode.decode_text('{"caption": "x", "label": 1}', "json"), "caption", "label")) == {}


@pytest.mark.parametrize(("value", "classes", "expected"), [
    (None, {"a": 0, "b": 1}, -1), (1, {"a": 0, "b": 1}, 1), ("b", {"a": 0, "b": 1}, 1), (2**63 - 1, None, 2**63 - 1),
    (2, {"a": 0, "b": 1}, "label_out_of_range"), (-1, None, "label_out_of_range"), (2**63, None, "label_out_of_range"),
    ("c", {"a": 0, "b": 1}, "unknown_label"), ("a", None, "unknown_label"),
    (1.0, None, "bad_label"), (True, None, "bad_label"), ([1], {"a": 0}, "bad_label"),
])
def test_label_id(value, classes, expected) -> None:
    if isinstance(expected, int):
        assert decode.label_id(value, classes) == expected
    else:
        with pytest.raises(decode.DecodeError) as err:
            decode.label_id(value, classes)
        assert err.value.kind == expected


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_decode_resizes_to_rgb(fmt: str) -> None:
    image = Image.new("L", (80, 48), 200)
    data = image_bytes(image, fmt)
    assert decode.probe_image(data) == (48, 80)
    out = decode.decode_image(data, (32, 56))
    assert out.shape == (32, 56, 3) and out.dtype == np.uint8 and abs(int(out.mean()) - 200) <= 2


def test_image_errors() -> None:
    with pytest.raises(decode.CorruptImage) as err:
        decode.decode_image(b"\x89PNG\r\n\x1a\n garbage", (32, 32))
    assert err.value.kind == "corrupt_image"
    truncated = image_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))[:300]
    with pytest.raises(decode.CorruptImage):
        decode.decode_image(truncated, (32, 32))
    small = image_bytes(Image.new("L", (8, 8)))
    ihdr = struct.pack(">II", 16384, 16384) + small[24:29]  # rewrite the header, fix its CRC
    huge = small[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + small[33:]
    with pytest.raises(decode.AbsurdResolution, match="exceeds"):
        decode.probe_image(huge)


# ---------------------------------------------------------------- whole samples


def test_decode_sample_builds_a_contract_row(cfg, sample) -> None:
    tokenizer = build_tokenizer()
    [out] = decode.decode_sample(sample, cfg, tokenizer)  # video.resolutions: nearest -> one row
    meta = json.loads(sample["json"])
    row = out.row
    assert out.key == "train-000005" and row["label"] == meta["label"] and row["caption"] == meta["caption"]
    assert json.loads(row["meta"]) == {k: v for k, v in meta.items() if k not in ("caption", "label")}  # e.g. direction
    assert row["video"].shape[0] == 8 and row["video"].shape[1:3] == row["image"].shape[:2]
    tokens = len(tokenizer.encode(meta["caption"]).ids)
    text_len = min(n for n in cfg.text.length_buckets if n >= tokens)  # the caption's length bucket
    assert row["audio_mel"].shape[1] == 128 and row["text_ids"].shape == row["text_mask"].shape == (text_len,)
    assert row["text_mask"].sum() == tokens
    assert out.shapes == {k: list(row[k].shape) for k in ("video", "image", "audio_mel", "text_ids")}
    assert out.bucket.startswith("v8x") and out.bucket.endswith(f"_t{text_len}")


def test_all_fitting_writes_one_row_per_bucket_from_one_decode_per_t(sample) -> None:
    """A 64x64 clip with ``all_fitting``: one row per square bucket not above 64x64, the other
    columns shared; a bucket resized down from the shared decode matches one decoded at its size."""
    multi = load_pipeline(None, ["video.buckets=[[8,32,32],[8,48,48],[4,32,32],[8,32,56],[8,64,64]]",
                                 "video.resolutions=all_fitting"])
    data = encode_video(64, 64, frames=16, fps=8)
    rows = decode.decode_sample({**sample, "mp4": data}, multi, build_tokenizer())
    assert [r.shapes["video"] for r in rows] == [[8, 64, 64, 3], [8, 32, 32, 3], [8, 48, 48, 3], [4, 32, 32, 3]]
    assert len({r.bucket for r in rows}) == 4 and {r.key for r in rows} == {"train-000005"}
    for r in rows[1:]:
        assert r.row["audio_mel"] is rows[0].row["audio_mel"] and r.row["image"] is rows[0].row["image"]
        assert r.shapes["audio_mel"] == rows[0].shapes["audio_mel"] and r.row["label"] == rows[0].row["label"]
    direct = decode.decode_video(data, (8, 32, 32), multi.video.fps).astype(np.float32)
    assert np.abs(rows[1].row["video"].astype(np.float32) - direct).mean() < 4.0
    calls: list[tuple[int, int, int]] = []
    real = decode.decode_video
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode, "decode_video", lambda data, size, *a, **k: calls.append(size) or real(data, size, *a, **k))
        decode.decode_sample({**sample, "mp4": data}, multi, build_tokenizer())
    assert calls == [(8, 64, 64), (4, 32, 32)]  # once per T, at the largest size for that T


def test_decode_sample_takes_audio_from_the_video_track(cfg, sample) -> None:
    with_track = {"__key__": "k", "mp4": encode_video(64, 64, frames=24, fps=12, audio_rate=16000), "json": sample["json"]}
    audio_only = load_pipeline(None, ["modalities.audio_from_video=true", "modalities.enabled=[audio,text]",
                                      "modalities.required=[audio]"])
    [out] = decode.decode_sample(with_track, audio_only, build_tokenizer())
    assert set(out.shapes) == {"audio_mel", "text_ids"} and out.shapes["audio_mel"] == [256, 128]  # 2 s clip
    assert "video" not in out.row
    with pytest.raises(decode.MissingModality, match="audio"):  # audio_from_video off, audio required
        decode.decode_sample(with_track, cfg, build_tokenizer())


def test_decode_sample_errors(cfg, sample) -> None:
    tokenizer = build_tokenizer()
    no_audio = {k: v for k, v in sample.items() if k not in ("wav", "flac")}
    with pytest.raises(decode.MissingModality, match="audio") as err:
        decode.decode_sample(no_audio, cfg, tokenizer)
    assert err.value.kind == "missing_modality"
    from_video = load_pipeline(None, ["modalities.audio_from_video=true"])
    with pytest.raises(decode.MissingModality, match="audio"):  # allowed, but this mp4 has no soundtrack
        decode.decode_sample(no_audio, from_video, tokenizer)
    with pytest.raises(decode.UnsafeMemberName) as err:
        decode.decode_sample({**sample, "__key__": "../x"}, cfg, tokenizer)
    assert err.value.kind == "unsafe_member_name"
    with pytest.raises(decode.UnsafeMemberName):
        decode.decode_sample({**sample, "../../etc/passwd": b""}, cfg, tokenizer)
    with pytest.raises(decode.BadTextEncoding):
        decode.decode_sample({**sample, "json": b'{"caption": "\xff\xfe"}'}, cfg, tokenizer)
    assert set(decode.ERROR_KINDS) >= {
        "corrupt_video", "unknown_codec", "absurd_resolution", "empty_audio", "nan_audio",
        "bad_text_encoding", "corrupt_image", "missing_modality", "unsafe_member_name", "absurd_audio",
        "bad_label", "label_out_of_range", "unknown_label", "empty_caption", "sample_timeout"}


def test_labels_are_judged_against_the_declared_classes(sample) -> None:
    tokenizer = build_tokenizer()
    names = [f"n{i}" for i in range(10)]
    named = load_pipeline(None, [f"dataset.classes={json.dumps(names)}"])
    by_name = {**sample, "json": json.dumps({"caption": "the digit three", "label": "n3", "colour": "red"}).encode()}
    [out] = decode.decode_sample(by_name, named, tokenizer)
    row = out.row
    assert row["label"] == 3 and json.loads(row["meta"]) == {"colour": "red"}
    for label, kind in ((42, "label_out_of_range"), ("n42", "unknown_label")):
        bad = {**sample, "json": json.dumps({"caption": "the digit three", "label": label}).encode()}
        with pytest.raises(decode.DecodeError) as err:
            decode.decode_sample(bad, named, tokenizer)
        assert err.value.kind == kind


def test_empty_caption_where_text_is_required(cfg, sample) -> None:
    empty = {**sample, "json": b'{"caption": ["", "  "], "label": 1}'}
    with pytest.raises(decode.EmptyCaption):
        decode.decode_sample(empty, cfg, build_tokenizer())
    optional = load_pipeline(None, ["modalities.required=[video,audio]"])
    [out] = decode.decode_sample(empty, optional, build_tokenizer())
    assert "text_ids" not in out.shapes and out.row["label"] == 1  # kept without text, label still read


def test_a_corrupt_candidate_falls_back_to_the_next_extension(cfg, sample) -> None:
    """A broken mp4 beside a good webm of the same sample: the webm is decoded instead of skipping."""
    both = {**sample, "mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(200), "webm": encode_video(64, 64, 16, 8, ext="webm")}
    [out] = decode.decode_sample(both, cfg, build_tokenizer())
    assert out.shapes["video"][0] == 8 and frame_indices(out.row["video"])[-1] == 15
    with pytest.raises(decode.CorruptVideo):  # with no good candidate, the first one's error
        decode.decode_sample({**both, "webm": b"junk"}, cfg, build_tokenizer())


def test_time_limit_interrupts_a_decode_loop_in_any_thread() -> None:
    """The watchdog raises inside the decoding thread (Ray Data runs actor UDFs off the main thread)."""
    def spin() -> float:
        start = time.monotonic()
        with pytest.raises(decode.SampleTimeout), decode.time_limit(0.3):
            while time.monotonic() - start < 30:
                pass
        return time.monotonic() - start

    assert spin() < 15  # interrupted: uninterrupted it spins 30 s (a busy CI box is slow to switch threads)
    seconds: list[float] = []
    worker = threading.Thread(target=lambda: seconds.append(spin()))
    worker.start()
    worker.join(30)
    assert seconds and seconds[0] < 15
    with decode.time_limit(0.2):  # a body that ends in time is never interrupted, also not later
        pass
    time.sleep(0.4)


def test_errors_pickle_with_their_kind() -> None:
    for error in (decode.CorruptVideo("truncated"), decode.DecodeError("custom_kind", "why")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and copy.kind == error.kind and str(copy) == str(error)
    assert str(decode.NanAudio("3 samples")) == "nan_audio: 3 samples"


def test_check_member_name() -> None:
    for good in ("train-000001", "sub/dir/key.mp4", "a..b.json"):
        decode.check_member_name(good)
    for bad in ("../x", "/etc/passwd", "a/../../b", "", "a\\b"):
        with pytest.raises(decode.UnsafeMemberName):
            decode.check_member_name(bad)
