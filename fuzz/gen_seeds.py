#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/seed-*.

Run from anywhere: `python3 fuzz/gen_seeds.py`. Every seed is < 4 KiB. The committed
corpus is this seed set plus what fuzzing found, trimmed with `cargo fuzz cmin`; run this
again to restore the hand-written seeds after a cmin dropped some.

stage_parser seeds use the framed format of fuzz/src/frames.rs: frames of
`ctl len-1 bytes`, ctl bit 0 = stream (0 stdout, 1 stderr); ctl >= 0xF0: repeat 2^(bits 1..3).
"""
import os
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))
OUT, ERR = 0, 1


def write(target, name, data):
    assert len(data) < 4096, (target, name, len(data))
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def frames(pieces, chunk=64):
    """pieces: [(stream, bytes)] -> framed input, each piece cut into `chunk`-byte reads."""
    out = bytearray()
    for stream, data in pieces:
        for i in range(0, len(data), chunk):
            c = data[i:i + chunk]
            out += bytes([stream, len(c) - 1]) + c
    return bytes(out)


def repeated(stream, data, power):
    """One frame of `data` (<= 256 bytes) fed 2^power times."""
    return bytes([0xF0 | stream | (power << 1), len(data) - 1]) + data


# --- stage_parser ---------------------------------------------------------------------

BAR = "\u2588"


def tqdm(total, steps=(0, 1, 2), desc=""):
    s = ""
    for d in steps:
        cells = BAR * (10 * d // total) + " " * (10 - 10 * d // total)
        pct = 100 * d // total
        rate = "?it/s" if d == 0 else " 9.87it/s"
        s += f"\r{desc}{pct:3d}%|{cells}| {d}/{total} [00:00<00:01, {rate}]"
    return (s + "\n").encode()


MUSETALK_OUT = [
    "Loads checkpoint by local backend from path: ./models/dwpose/dw-ll_ucoco_384.pth",
    "cuda start",
    "load unet model from ./models/musetalkV15/unet.pth",
    "Loaded inference config: {'task_0': {'video_path': '/data/jobs/j/video_j.mp4', 'audio_path': '/data/jobs/j/audio_j.wav'}}",
    "Extracting landmarks... time-consuming operation",
    "reading images...",
    "get key_landmark and face bounding boxes with the default value",
    "*" * 40 + "bbox_shift parameter adjustment" + "*" * 40,
    "Total frame:\u300c50\u300d Manually adjust range : [ -9~9 ] , the current value: 0",
    "*" * 60,
    "Number of frames: 50",
    "Starting inference",
    "Padding generated images to original video size",
    "Video generation command: ffmpeg -y -v warning -r 25.0 -f image2 -i ./r/v15/v_a/%08d.png -vcodec libx264 -vf format=yuv420p -crf 18 ./r/v15/temp_v_a.mp4",
    "Audio combination command: ffmpeg -y -v warning -i /data/jobs/j/audio_j.wav -i ./r/v15/temp_v_a.mp4 ./r/v15/v_a.mp4",
    "Results saved to ./r/v15/v_a.mp4",
]


def musetalk_run(lines, bars_after=("reading images...", "Starting inference", "Padding generated images to original video size")):
    pieces = []
    for l in lines:
        pieces.append((OUT, (l + "\n").encode()))
        if l in bars_after:
            pieces.append((ERR, tqdm(4, (0, 2, 4))))
    return pieces


def stage_parser():
    t = "stage_parser"
    write(t, "musetalk-success", frames(musetalk_run(MUSETALK_OUT), 96))
    write(t, "musetalk-success-odd-cuts", frames(musetalk_run(MUSETALK_OUT[3:13]), 13))
    err = MUSETALK_OUT[:5] + [MUSETALK_OUT[7], "Error occurred during processing: division by zero"]
    write(t, "musetalk-task-error", frames(musetalk_run(err), 200))
    write(t, "musetalk-empty-error", frames([(OUT, b"Loaded inference config: {}\nError occurred during processing: \n")], 256))
    crash = [(OUT, (MUSETALK_OUT[0] + "\n" + MUSETALK_OUT[2] + "\n").encode()),
             (ERR, b"Traceback (most recent call last):\n  File \"/m/scripts/inference.py\", line 12, in <module>\n    load_all_model()\nRuntimeError: CUDA error: out of memory\n")]
    write(t, "musetalk-crash", frames(crash, 100))
    write(t, "musetalk-saved-coords", frames([(OUT, b"Loaded inference config: {}\r\nUsing saved coordinates\r\nExtracting landmarks...\r\nNumber of frames: 3\r\n")], 5))
    write(t, "tqdm-redraws", frames([(ERR, tqdm(10, range(0, 11)))], 31))
    write(t, "tqdm-odd", frames([(ERR, b"\r 40%|####      | 4/10 [00:01<00:01,  3.2it/s]\r|| 5/4\r a | b\r100%|##########| 18446744073709551615/18446744073709551615\n")], 256))
    json_lines = [
        '{"event":"stage_start","name":"Face Detection"}',
        '{"event":"progress","done":3,"total":9}',
        '{"event":"stage_start","name":"unet_inference","id":"a"}',
        '{"event":"stage_end","name":"face_detection"}',
        '{"event":"stage_end","name":"never_started"}',
        '{"event":"stage_start","name":"' + "x" * 60 + '"}',
        '{"event":"stage_start","name":"\u00c9tape \u2013 \u9762"}',
        '{"event":"stage_start","name":"  "}',
        '{"event":"progress","done":5,"total":null}',
        '{"event":"error","message":"CUDA out of memory"}',
        '{"event":"result","output":"/data/jobs/j/result/out.mp4"}',
        '   {"event": "stage_start", "name": 5}',
        'plain log line {"event":"stage_start","name":"x"}',
    ]
    write(t, "json-stages", frames([(OUT, ("\n".join(json_lines) + "\n").encode())], 128))
    write(t, "json-on-stderr", frames([(ERR, b'{"event":"stage_start","name":"x"}\n')], 64))
    ff = "frame=1\nfps=0.0\nout_time=00:00:00.040000\nprogress=continue\nframe=25\nframe= 50 \nframe=-1\nframe=abc\nprogress=end\nframe=51\n"
    write(t, "ffmpeg-progress", frames([(OUT, ff.encode()), (ERR, b"[libx264 @ 0x55] frame=5\nprogress=end\n")], 48))
    write(t, "crlf-blank-whitespace", frames([(OUT, b"\r\n\r\n   \n\t\r\nStarting inference  \t\r\n\n\rResults saved to   \n")], 9))
    write(t, "invalid-utf8", frames([(OUT, b"Number of frames: \xff\xfe 50\n\xc3\x28Starting inference\n"), (ERR, b"\xe2\x82 10%|#| 1/10\r")], 16))
    long_line = repeated(OUT, b"x" * 256, 6) + frames([(OUT, b"tail\nStarting inference\n")])  # 16 KiB line, then markers
    write(t, "long-line", long_line)
    write(t, "no-newline-at-end", frames([(OUT, b"Loaded inference config: {}\nResults saved to /tmp/o.mp4")], 64))


# --- worker_event ---------------------------------------------------------------------

def worker_event():
    t = "worker_event"
    lines = {
        "ready": '{"event":"ready","worker":{"name":"gpu0","model":"musetalk-v15","device":"cuda:0"},"load_seconds":42.5}',
        "ready-bare": '{"event": "ready"}',
        "stage-start": '{"event":"stage_start","id":"a1b2","name":"unet_inference","t":12345.678,"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}',
        "stage-end": '{"event":"stage_end","id":"a1b2","name":"face_detection","t":12.5}',
        "progress": '{"event":"progress","id":"c3d4","done":3,"total":10}',
        "progress-null": '{"event":"progress","id":"c3d4","done":0,"total":null}',
        "result-infer": '{"event":"result","id":"c3d4","output":"/data/jobs/c3d4/result/output.mp4","frames":75,"seconds":3.0}',
        "result-prepare": '{"event":"result","id":"a1b2","frames":50}',
        "error": '{"event":"error","id":"c3d4","message":"CUDA out of memory. Tried to allocate 2.00 GiB"}',
        "error-null-id": '{"event":"error","id":null,"message":"malformed request: Expecting value: line 1 column 1 (char 0)"}',
        "junk-unknown": '{"event":"unknown","id":"x"}',
        "junk-negative": '{"event":"progress","id":"a","done":-1}',
        "junk-array": "[1,2]",
        "junk-text": "loading model...",
        "junk-open": "{not json",
        "big-numbers": '{"event":"progress","id":"a","done":18446744073709551615,"total":1e3}',
        "escapes": '{"event":"stage_start","id":"\\u00e9\\ud83d\\ude00","name":"a\\nb\\"c","t":-0.0}',
        "dup-field": '{"event":"error","id":"a","message":"one","message":"two"}',
        "dup-tag": '{"event":"error","event":"ready","id":"a","message":"m"}',
        "lines": '\n'.join(['{"event":"ready"}', '  {"event":"progress","id":"r","done":1}  ', 'stderr leak', '{"event":"result","id":"r"}']),
    }
    for name, line in lines.items():
        write(t, name, line.encode())


# --- multipart_raw --------------------------------------------------------------------

def wav(rate=8000, channels=1, bits=8, samples=800, declared=None):
    block = channels * ((bits + 7) // 8)
    n = samples * block
    hdr = b"RIFF" + struct.pack("<I", 36 + n) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits)
    return hdr + b"data" + struct.pack("<I", n if declared is None else declared) + bytes((i * 37) % 251 for i in range(n))


def body(parts, boundary="X", end=True):
    b = bytearray()
    for name, filename, ct, data in parts:
        b += f"--{boundary}\r\nContent-Disposition: form-data".encode()
        if name is not None:
            b += f'; name="{name}"'.encode()
        if filename is not None:
            b += f'; filename="{filename}"'.encode()
        b += b"\r\n"
        if ct:
            b += f"Content-Type: {ct}\r\n".encode()
        b += b"\r\n" + data + b"\r\n"
    if end:
        b += f"--{boundary}--\r\n".encode()
    return bytes(b)


def multipart_raw():
    t = "multipart_raw"
    mp4 = open(os.path.join(ROOT, "assets", "tiny-video.mp4.bin"), "rb").read()
    webm = open(os.path.join(ROOT, "assets", "tiny-video.webm.bin"), "rb").read()
    a = wav(samples=400)
    write(t, "inference-valid", body([("video", "face.mp4", "video/mp4", mp4), ("audio", "speech.wav", "audio/wav", a), ("bbox_shift", None, None, b"-3"), ("batch_size", None, None, b"4")]))
    write(t, "inference-webm", body([("audio", "a.WAV", None, a), ("video", "v.webm", "video/webm", webm)]))
    write(t, "avatar-valid", body([("avatar_id", None, None, b"alice_01"), ("video", "alice.mov", "video/quicktime", mp4), ("bbox_shift", None, None, b"5")]))
    write(t, "speak-valid", body([("audio", "clip.wav", "audio/wav", a), ("batch_size", None, None, b"8")]))
    write(t, "empty-and-missing", body([("video", "v.mp4", None, b""), ("audio", None, None, b"")]))
    write(t, "duplicate-part", body([("audio", "a.wav", None, a[:100]), ("audio", "b.wav", None, a[:100])]))
    write(t, "unknown-part", body([("face", "f.png", "image/png", b"\x89PNG\r\n\x1a\n"), ("video", "v.mp4", None, b"x")]))
    write(t, "bad-numbers", body([("bbox_shift", None, None, b"999"), ("batch_size", None, None, b"0"), ("avatar_id", None, None, b"../../etc")]))
    write(t, "long-text", body([("avatar_id", None, None, b"a" * 300)]))
    write(t, "path-filename", body([("video", "../../../../tmp/evil.mp4", None, b"not a video"), ("audio", "/etc/passwd", None, b"RIFF")]))
    write(t, "no-name", body([(None, "v.mp4", None, b"abc"), ("", None, None, b"")]))
    write(t, "unterminated", body([("video", "v.mp4", None, mp4[:200])], end=False))
    write(t, "preamble-epilogue", b"preamble\r\n" + body([("avatar_id", None, None, b"bob")]) + b"epilogue")
    write(t, "just-boundary", b"--X--\r\n")
    write(t, "lf-only", body([("avatar_id", None, None, b"lf")]).replace(b"\r\n", b"\n"))
    write(t, "lying-wav", body([("video", "v.mp4", None, mp4), ("audio", "a.wav", None, wav(samples=100, declared=0xFFFFFF00))]))


if __name__ == "__main__":
    stage_parser()
    worker_event()
    multipart_raw()
    for target in sorted(os.listdir(os.path.join(ROOT, "corpus"))):
        d = os.path.join(ROOT, "corpus", target)
        files = os.listdir(d)
        print(f"{target}: {len(files)} files, {sum(os.path.getsize(os.path.join(d, f)) for f in files)} bytes")
