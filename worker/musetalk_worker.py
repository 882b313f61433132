#!/usr/bin/env python3
"""MuseTalk realtime worker: loads MuseTalk once, then serves JSON-lines requests.

Speaks the protocol in docs/worker-protocol.md on stdin/stdout:

    requests  (stdin):  prepare | infer | shutdown
    events    (stdout): ready, stage_start, stage_end, progress, batch, first_frame, result, error

It does what MuseTalk's ``Avatar`` (scripts/realtime_inference.py) does, without its
``input()`` prompts: ``prepare`` extracts the frames of a video, finds the face boxes,
encodes the VAE latents and builds the blending masks once per avatar (saved under the
avatar's directory in Avatar's layout); ``infer`` turns a clip of audio into Whisper
features, runs UNet + VAE decode batch by batch, blends the mouths back into the frames,
encodes them with ffmpeg and muxes the audio in.

Run it from anywhere; ``--musetalk-dir`` is the MuseTalk checkout (it becomes the working
directory, as MuseTalk loads its models by relative paths):

    python3 musetalk_worker.py --musetalk-dir /opt/MuseTalk --gpu-id 0 --version v15

Layout of this file:
  * ``MuseTalkModels``: the ONLY place that touches torch, cv2, numpy or MuseTalk.
    Its heavy imports happen in ``load`` so this module imports without them.
  * ``Worker``: protocol and request handling; it calls the models object through the
    small interface below and runs ffmpeg itself, so tests substitute the models.
  * ``main``: arguments, stdout hygiene (fd 1 -> stderr, private protocol fd), exit codes.

Models interface used by ``Worker`` (a test fake implements the same):
    frame_ext                                   -> extension of frames written by write_frame
    load(args) -> dict                          -> loads the models; the ``worker`` info of ``ready``
    extract_frames(video_path, full_imgs_dir) -> [path]
    landmarks(paths, bbox_shift) -> (coords, frames)
    encode_latents(coords, frames) -> (coords, latents)
    prepare_masks(frames, coords) -> (masks, mask_coords)
    save_material(avatar_dir, material)         (material: Material, cycles filled in)
    load_material(avatar_dir) -> Material
    audio_chunks(audio_path, fps) -> sequence   (len() = frames to generate)
    generate_batches(chunks, latents, batch_size) -> iterator of lists of face crops
    blend(material, idx, face) -> frame
    write_frame(path, frame)
    after_error(exc) -> bool                    (True: the worker cannot go on, exit after `error`)
"""

import argparse
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback

WORKER_NAME = "musetalk"
EXIT_OK = 0
EXIT_LOAD_FAILED = 2
EXIT_UNRECOVERABLE = 3

# Avatar's file names (scripts/realtime_inference.py), under the request's avatar_dir.
FULL_IMGS = "full_imgs"
MASK_DIR = "mask"
COORDS_PKL = "coords.pkl"
LATENTS_PT = "latents.pt"
MASK_COORDS_PKL = "mask_coords.pkl"
# Avatar writes "avator_info.json" (sic) first; we write avatar_info.json LAST, so its
# presence means the material is complete.
AVATAR_INFO = "avatar_info.json"


def log(message):
    """A free-form log line on stderr (the sidecar turns it into a tracing event)."""
    try:
        sys.stderr.write("musetalk_worker: %s\n" % message)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class RequestError(Exception):
    """A request failure whose message says it all (no traceback is logged)."""


class Material:
    """An avatar's prepared material: the forward+reversed cycles, as Avatar keeps them."""

    def __init__(self, frames, coords, latents, masks, mask_coords, info):
        self.frames = frames            # full frames (BGR images)
        self.coords = coords            # face boxes (x1, y1, x2, y2), v15 margin applied
        self.latents = latents          # VAE latents of the masked+reference crops
        self.masks = masks              # blending masks
        self.mask_coords = mask_coords  # crop boxes the masks belong to
        self.info = info                # avatar_info.json content

    def __len__(self):
        return len(self.frames)

    def check(self):
        sizes = {len(self.frames), len(self.coords), len(self.latents), len(self.masks),
                 len(self.mask_coords)}
        if len(sizes) != 1 or not self.frames:
            raise RequestError(
                "avatar material is inconsistent: %d frames, %d coords, %d latents, %d masks, "
                "%d mask coords" % (len(self.frames), len(self.coords), len(self.latents),
                                    len(self.masks), len(self.mask_coords)))


def cycle(items):
    """Forward then backward, as Avatar builds its frame/coord/latent/mask cycles."""
    items = list(items)
    return items + items[::-1]


# --------------------------------------------------------------------------------------
# Every MuseTalk / torch / cv2 / numpy call lives in this class.
# --------------------------------------------------------------------------------------

class MuseTalkModels:
    frame_ext = "png"

    def load(self, args):
        self.args = args
        musetalk_dir = os.path.abspath(args.musetalk_dir)
        # MuseTalk opens its models by paths relative to its repo root
        # (./models/..., ./musetalk/utils/dwpose/...), and imports `musetalk.*`.
        os.chdir(musetalk_dir)
        if musetalk_dir not in sys.path:
            sys.path.insert(0, musetalk_dir)

        import torch
        self.torch = torch
        torch.set_grad_enabled(False)
        if torch.cuda.is_available():
            self.device = torch.device("cuda:%d" % args.gpu_id)
            # FaceParsing, the VAE wrapper and preprocessing's detectors use the *current*
            # CUDA device ("cuda" / .cuda()): point it at ours before they load.
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            log("CUDA is not available: running on the CPU")

        import cv2
        import numpy as np
        from transformers import WhisperModel
        from musetalk.utils.utils import load_all_model, datagen
        from musetalk.utils.audio_processor import AudioProcessor
        from musetalk.utils.blending import get_image_prepare_material, get_image_blending
        from musetalk.utils.face_parsing import FaceParsing
        # Importing preprocessing loads DWPose and the S3FD face detector.
        from musetalk.utils import preprocessing
        self.cv2, self.np = cv2, np
        self._datagen = datagen
        self._get_image_prepare_material = get_image_prepare_material
        self._get_image_blending = get_image_blending
        self._preprocessing = preprocessing

        vae, unet, pe = load_all_model(
            unet_model_path=args.unet_model_path,
            vae_type=args.vae_type,
            unet_config=args.unet_config,
            device=self.device,
        )
        self.timesteps = torch.tensor([0], device=self.device)
        if args.dtype == "float16":
            pe = pe.half()
            vae.vae = vae.vae.half()
            unet.model = unet.model.half()
        self.pe = pe.to(self.device)
        vae.vae = vae.vae.to(self.device)
        unet.model = unet.model.to(self.device)
        self.vae, self.unet = vae, unet
        self.weight_dtype = unet.model.dtype

        self.audio_processor = AudioProcessor(feature_extractor_path=args.whisper_dir)
        whisper = WhisperModel.from_pretrained(args.whisper_dir)
        whisper = whisper.to(device=self.device, dtype=self.weight_dtype).eval()
        whisper.requires_grad_(False)
        self.whisper = whisper

        if args.version == "v15":
            self.fp = FaceParsing(left_cheek_width=args.left_cheek_width,
                                  right_cheek_width=args.right_cheek_width)
        else:
            self.fp = FaceParsing()

        info = {
            "name": WORKER_NAME,
            "version": args.version,
            "device": str(self.device),
            "gpu_id": args.gpu_id,
            "dtype": str(self.weight_dtype).replace("torch.", ""),
            "torch": torch.__version__,
            "unet_model_path": args.unet_model_path,
            "vae_type": args.vae_type,
        }
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
        return info

    # ---- prepare ----------------------------------------------------------------------

    def extract_frames(self, video_path, full_imgs_dir):
        """Frames of the video (or image, or directory of PNGs) as 00000000.png, ..."""
        cv2 = self.cv2
        os.makedirs(full_imgs_dir, exist_ok=True)
        paths = []

        def save(frame):
            path = os.path.join(full_imgs_dir, "%08d.png" % len(paths))
            if not cv2.imwrite(path, frame):
                raise RequestError("cannot write %s" % path)
            paths.append(path)

        if os.path.isdir(video_path):
            for name in sorted(n for n in os.listdir(video_path) if n.lower().endswith(".png")):
                frame = cv2.imread(os.path.join(video_path, name))
                if frame is None:
                    raise RequestError("cannot read image %s" % name)
                save(frame)
        elif os.path.splitext(video_path)[1].lower() in (".png", ".jpg", ".jpeg", ".bmp",
                                                           ".tif", ".tiff", ".webp"):
            frame = cv2.imread(video_path)
            if frame is None:
                raise RequestError("cannot read image %s" % video_path)
            save(frame)
        else:
            if not os.path.isfile(video_path):
                raise RequestError("video not found: %s" % video_path)
            capture = cv2.VideoCapture(video_path)
            try:
                while True:
                    ok, frame = capture.read()
                    if not ok:
                        break
                    save(frame)
            finally:
                capture.release()
        if not paths:
            raise RequestError("no frames could be read from %s" % video_path)
        return paths

    def landmarks(self, paths, bbox_shift):
        # v1.5 ignores bbox_shift, as realtime_inference.py does.
        shift = 0 if self.args.version == "v15" else int(bbox_shift or 0)
        coords, frames = self._preprocessing.get_landmark_and_bbox(paths, shift)
        placeholder = self._preprocessing.coord_placeholder
        for index, box in enumerate(coords):
            if tuple(box) == tuple(placeholder):
                # Avatar silently skips such a frame's latent, which misaligns every later
                # frame and stalls its blending thread: fail the request instead.
                raise RequestError("no face detected in frame %d of %d" % (index, len(coords)))
        return coords, frames

    def encode_latents(self, coords, frames):
        cv2 = self.cv2
        coords = list(coords)
        latents = []
        for index, (box, frame) in enumerate(zip(coords, frames)):
            x1, y1, x2, y2 = [int(v) for v in box]
            if self.args.version == "v15":
                y2 = min(y2 + self.args.extra_margin, frame.shape[0])
            coords[index] = [x1, y1, x2, y2]
            crop = frame[y1:y2, x1:x2]
            if crop.size == 0:
                raise RequestError("empty face crop in frame %d: %s" % (index, coords[index]))
            crop = cv2.resize(crop, (256, 256), interpolation=cv2.INTER_LANCZOS4)
            with self.torch.no_grad():
                latents.append(self.vae.get_latents_for_unet(crop))
        return coords, latents

    def prepare_masks(self, frames, coords):
        mode = self.args.parsing_mode if self.args.version == "v15" else "raw"
        masks, mask_coords = [], []
        for frame, box in zip(frames, coords):
            mask, crop_box = self._get_image_prepare_material(frame, list(box), fp=self.fp,
                                                              mode=mode)
            masks.append(mask)
            mask_coords.append(crop_box)
        return masks, mask_coords

    def save_material(self, avatar_dir, material):
        import pickle
        cv2 = self.cv2
        full_imgs = os.path.join(avatar_dir, FULL_IMGS)
        mask_dir = os.path.join(avatar_dir, MASK_DIR)
        os.makedirs(full_imgs, exist_ok=True)
        os.makedirs(mask_dir, exist_ok=True)
        source_frames = len(material.frames) // 2
        for index, (frame, mask) in enumerate(zip(material.frames, material.masks)):
            name = "%08d.png" % index
            # The first half are the extracted frames, already on disk.
            frame_path = os.path.join(full_imgs, name)
            if index >= source_frames or not os.path.exists(frame_path):
                if not cv2.imwrite(frame_path, frame):
                    raise RequestError("cannot write %s" % frame_path)
            if not cv2.imwrite(os.path.join(mask_dir, name), mask):
                raise RequestError("cannot write mask %s" % name)
        with open(os.path.join(avatar_dir, MASK_COORDS_PKL), "wb") as handle:
            pickle.dump(material.mask_coords, handle)
        with open(os.path.join(avatar_dir, COORDS_PKL), "wb") as handle:
            pickle.dump(material.coords, handle)
        self.torch.save(material.latents, os.path.join(avatar_dir, LATENTS_PT))

    def load_material(self, avatar_dir):
        import pickle
        with open(os.path.join(avatar_dir, AVATAR_INFO), encoding="utf-8") as handle:
            info = json.load(handle)
        latents = self.torch.load(os.path.join(avatar_dir, LATENTS_PT),
                                  map_location=self.device)
        with open(os.path.join(avatar_dir, COORDS_PKL), "rb") as handle:
            coords = pickle.load(handle)
        with open(os.path.join(avatar_dir, MASK_COORDS_PKL), "rb") as handle:
            mask_coords = pickle.load(handle)
        read_imgs = self._preprocessing.read_imgs
        frames = read_imgs(_numbered_images(os.path.join(avatar_dir, FULL_IMGS)))
        masks = read_imgs(_numbered_images(os.path.join(avatar_dir, MASK_DIR)))
        for kind, images in (("frame", frames), ("mask", masks)):
            if any(image is None for image in images):
                raise RequestError("unreadable %s image in %s" % (kind, avatar_dir))
        return Material(frames, coords, latents, masks, mask_coords, info)

    # ---- infer ------------------------------------------------------------------------

    def audio_chunks(self, audio_path, fps):
        if not os.path.isfile(audio_path):
            raise RequestError("audio not found: %s" % audio_path)
        features, librosa_length = self.audio_processor.get_audio_feature(
            audio_path, weight_dtype=self.weight_dtype)
        if math.floor(librosa_length / 16000 * int(fps)) < 1:
            raise RequestError("audio is too short for one frame at %s fps: %s" % (fps, audio_path))
        return self.audio_processor.get_whisper_chunk(
            features, self.device, self.weight_dtype, self.whisper, librosa_length, fps=fps,
            audio_padding_length_left=self.args.audio_padding_length_left,
            audio_padding_length_right=self.args.audio_padding_length_right,
        )

    def generate_batches(self, chunks, latents, batch_size):
        torch, device = self.torch, self.device
        batches = self._datagen(chunks, latents, batch_size, device=device)
        while True:
            with torch.no_grad():
                try:
                    whisper_batch, latent_batch = next(batches)
                except StopIteration:
                    return
                audio_feature_batch = self.pe(whisper_batch.to(device))
                latent_batch = latent_batch.to(device=device, dtype=self.unet.model.dtype)
                pred_latents = self.unet.model(latent_batch, self.timesteps,
                                               encoder_hidden_states=audio_feature_batch).sample
                pred_latents = pred_latents.to(device=device, dtype=self.vae.vae.dtype)
                recon = self.vae.decode_latents(pred_latents)
            yield list(recon)

    def blend(self, material, idx, face):
        cv2, np = self.cv2, self.np
        i = idx % len(material.coords)
        x1, y1, x2, y2 = [int(v) for v in material.coords[i]]
        face = cv2.resize(face.astype(np.uint8), (x2 - x1, y2 - y1))
        return self._get_image_blending(material.frames[i].copy(), face, [x1, y1, x2, y2],
                                        material.masks[i], material.mask_coords[i])

    def write_frame(self, path, frame):
        if not self.cv2.imwrite(path, frame):
            raise RequestError("cannot write frame %s" % path)

    def after_error(self, exc):
        torch = self.torch
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            return False
        # A CUDA error other than OOM (device-side assert, illegal address, ...) poisons
        # the context: every later request would fail. Exit so the sidecar restarts us.
        return "CUDA error" in str(exc)


def _numbered_images(directory):
    names = [n for n in os.listdir(directory)
             if os.path.splitext(n)[1].lower() in (".png", ".jpg", ".jpeg")]
    names.sort(key=lambda n: int(os.path.splitext(n)[0]))
    return [os.path.join(directory, n) for n in names]


# --------------------------------------------------------------------------------------
# Protocol and request handling (no model code below this line).
# --------------------------------------------------------------------------------------

class _Blender(threading.Thread):
    """Blends generated faces into frames and writes them, like Avatar.process_frames."""

    def __init__(self, models, material, frames_dir, frame_ext, maxsize, sink=None):
        super().__init__(name="blender", daemon=True)
        self.models, self.material = models, material
        self.frames_dir, self.frame_ext = frames_dir, frame_ext
        # A streamed infer: each frame, once written, also goes to the encoder's stdin
        # (frames arrive in order: one thread blends them in the order they were queued).
        self.sink = sink
        self.queue = queue.Queue(maxsize=maxsize)
        self.error = None
        self.written = 0

    def run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain, so the producer never blocks
            idx, face = item
            try:
                frame = self.models.blend(self.material, idx, face)
                path = os.path.join(self.frames_dir, "%08d.%s" % (idx, self.frame_ext))
                self.models.write_frame(path, frame)
                if self.sink is not None:
                    with open(path, "rb") as handle:
                        self.sink.write(handle.read())
                    self.sink.flush()
                self.written += 1
            except BaseException as exc:  # noqa: B902 - handed to the main thread
                self.error = exc

    def put(self, item):
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue


class Worker:
    """Serves protocol requests with a models object (see the module docstring)."""

    def __init__(self, models, args):
        self.models = models
        self.args = args
        self.base_dir = os.getcwd()  # request paths are relative to where we were started
        self.out = None
        self._out_lock = threading.Lock()
        self._cache = {}  # avatar_dir -> (stamp, Material), most recently used last
        self.loaded = False

    # ---- output -----------------------------------------------------------------------

    def emit(self, event, **fields):
        payload = {"event": event}
        payload.update(fields)
        line = json.dumps(payload, ensure_ascii=True, allow_nan=False, default=str) + "\n"
        with self._out_lock:
            self.out.write(line)
            self.out.flush()

    def _stage_event(self, event, rid, name, traceparent):
        self.emit(event, id=rid, name=name, t=time.monotonic(), traceparent=traceparent)

    class _Stage:
        def __init__(self, worker, rid, name, traceparent):
            self.worker, self.rid, self.name, self.traceparent = worker, rid, name, traceparent

        def __enter__(self):
            self.started = time.monotonic()
            self.worker._stage_event("stage_start", self.rid, self.name, self.traceparent)
            return self

        def __exit__(self, exc_type, exc, tb):
            # A failing stage still ends (with the worker's own end time); the `error`
            # event that follows ends the request.
            self.worker._stage_event("stage_end", self.rid, self.name, self.traceparent)
            log("%s %s: %.3f s%s" % (self.rid, self.name, time.monotonic() - self.started,
                                      " (failed)" if exc_type else ""))
            return False

    def stage(self, rid, name, traceparent):
        return Worker._Stage(self, rid, name, traceparent)

    # ---- main loop --------------------------------------------------------------------

    def load(self):
        started = time.monotonic()
        info = dict(self.models.load(self.args) or {})
        info.setdefault("name", WORKER_NAME)
        info["pid"] = os.getpid()
        info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        info["batch_size"] = self.args.batch_size
        info["fps"] = self.args.fps
        self.loaded = True
        return info, time.monotonic() - started

    def serve(self, stdin, proto_out):
        """Loads the models, says `ready`, serves requests; returns the exit status."""
        self.out = proto_out
        if not self.loaded:
            info, seconds = self.load()
            log("models loaded in %.1f s" % seconds)
            # Protocol 2: batch, first_frame, and `stream` (an infer's output written as
            # fragmented MP4 while its frames are blended).
            self.emit("ready", worker=info, load_seconds=round(seconds, 3), protocol=2, capabilities=["stream"])
        while True:
            line = stdin.readline()
            if not line:
                log("stdin closed: exiting")
                return EXIT_OK
            line = line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
            except ValueError as exc:
                log("malformed request line (%s): %.200s" % (exc, line))
                self.emit("error", id=None, message="malformed request: %s" % exc)
                continue
            if not isinstance(request, dict):
                self.emit("error", id=None, message="malformed request: not a JSON object")
                continue
            status = self.handle(request)
            if status is not None:
                return status

    def handle(self, request):
        """Runs one request; returns an exit status when the worker must stop, else None."""
        rid = request.get("id")
        op = request.get("op")
        if op == "shutdown":
            log("shutdown requested")
            return EXIT_OK
        if not isinstance(rid, str) or not rid:
            self.emit("error", id=None, message="malformed request: missing string `id`")
            return None
        handlers = {"prepare": self._prepare, "infer": self._infer}
        if op not in handlers:
            self.emit("error", id=rid, message="unknown op: %r" % (op,))
            return None
        started = time.monotonic()
        try:
            result = handlers[op](rid, request)
        except RequestError as exc:
            log("%s %s failed: %s" % (rid, op, exc))
            self.emit("error", id=rid, message=str(exc))
            return None
        except (Exception, SystemExit) as exc:  # MuseTalk calls exit() on some errors
            log("%s %s failed:\n%s" % (rid, op, traceback.format_exc().rstrip()))
            message = "%s: %s" % (type(exc).__name__, exc)
            self.emit("error", id=rid, message=message)
            fatal = False
            try:
                after_error = getattr(self.models, "after_error", None)
                fatal = bool(after_error(exc)) if after_error else False
            except Exception:  # noqa: BLE001 - recovery is best effort
                log("after_error failed:\n%s" % traceback.format_exc().rstrip())
            if fatal:
                log("unrecoverable error: exiting so the worker is restarted")
                return EXIT_UNRECOVERABLE
            return None
        log("%s %s done in %.3f s" % (rid, op, time.monotonic() - started))
        self.emit("result", id=rid, **result)
        return None

    # ---- requests ---------------------------------------------------------------------

    def _path(self, request, key):
        value = request.get(key)
        if not isinstance(value, str) or not value:
            raise RequestError("`%s` is required (a path)" % key)
        return os.path.normpath(os.path.join(self.base_dir, value))

    @staticmethod
    def _positive_int(request, key, default):
        value = request.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or value != int(value) or value < 1:
            raise RequestError("`%s` must be a positive integer, got %r" % (key, value))
        return int(value)

    def _prepare(self, rid, request):
        tp = request.get("traceparent")
        video_path = self._path(request, "video_path")
        avatar_dir = self._path(request, "avatar_dir")
        bbox_shift = request.get("bbox_shift") or 0
        if not isinstance(bbox_shift, (int, float)) or isinstance(bbox_shift, bool):
            raise RequestError("`bbox_shift` must be a number, got %r" % (bbox_shift,))
        if not os.path.exists(video_path):
            raise RequestError("video not found: %s" % video_path)
        os.makedirs(avatar_dir, exist_ok=True)
        self._cache.pop(avatar_dir, None)
        _clear_material(avatar_dir)
        models = self.models

        with self.stage(rid, "frame_extraction", tp):
            paths = models.extract_frames(video_path, os.path.join(avatar_dir, FULL_IMGS))
        with self.stage(rid, "face_detection", tp):
            coords, frames = models.landmarks(paths, bbox_shift)
        with self.stage(rid, "latent_encoding", tp):
            coords, latents = models.encode_latents(coords, frames)
        with self.stage(rid, "mask_generation", tp):
            # Masks depend only on the frame and its box: compute them once per source
            # frame and mirror them, instead of parsing every frame twice as Avatar does.
            masks, mask_coords = models.prepare_masks(frames, coords)
            info = {
                "avatar_id": request.get("avatar_id"),
                "video_path": video_path,
                "bbox_shift": bbox_shift,
                "version": getattr(self.args, "version", None),
                "extra_margin": getattr(self.args, "extra_margin", None),
                "parsing_mode": getattr(self.args, "parsing_mode", None),
                "frames": len(frames),
                "prepared_by": WORKER_NAME,
            }
            material = Material(cycle(frames), cycle(coords), cycle(latents), cycle(masks),
                                cycle(mask_coords), info)
            material.check()
            models.save_material(avatar_dir, material)
            _write_json_atomically(os.path.join(avatar_dir, AVATAR_INFO), info)
        self._remember(avatar_dir, material)
        return {"frames": len(frames)}

    def _material(self, avatar_dir):
        info_path = os.path.join(avatar_dir, AVATAR_INFO)
        try:
            st = os.stat(info_path)
        except FileNotFoundError:
            raise RequestError("avatar is not prepared: %s is missing" % info_path) from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._cache.get(avatar_dir)
        if cached is not None and cached[0] == stamp:
            self._cache[avatar_dir] = self._cache.pop(avatar_dir)  # most recently used
            return cached[1]
        started = time.monotonic()
        material = self.models.load_material(avatar_dir)
        material.check()
        log("loaded avatar %s (%d cycle frames) in %.3f s"
            % (avatar_dir, len(material), time.monotonic() - started))
        self._remember(avatar_dir, material, stamp)
        return material

    def _remember(self, avatar_dir, material, stamp=None):
        if stamp is None:
            st = os.stat(os.path.join(avatar_dir, AVATAR_INFO))
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        self._cache.pop(avatar_dir, None)
        self._cache[avatar_dir] = (stamp, material)
        limit = max(0, int(getattr(self.args, "avatar_cache", 1)))
        while len(self._cache) > limit:
            self._cache.pop(next(iter(self._cache)))

    def _infer(self, rid, request):
        tp = request.get("traceparent")
        avatar_dir = self._path(request, "avatar_dir")
        audio_path = self._path(request, "audio_path")
        output_path = self._path(request, "output_path")
        fps = self._positive_int(request, "fps", self.args.fps)
        batch_size = self._positive_int(request, "batch_size", self.args.batch_size)
        if not os.path.isfile(audio_path):
            raise RequestError("audio not found: %s" % audio_path)
        material = self._material(avatar_dir)  # before the first stage: cached or read back
        out_dir = os.path.dirname(output_path) or "."
        os.makedirs(out_dir, exist_ok=True)
        work_dir = tempfile.mkdtemp(prefix=".musetalk-%s-" % _safe(rid), dir=out_dir)
        try:
            return self._infer_in(rid, tp, material, audio_path, output_path, fps, batch_size,
                                  work_dir, stream=bool(request.get("stream")))
        finally:
            if getattr(self.args, "keep_temp", False):
                log("kept temporary files in %s" % work_dir)
            else:
                shutil.rmtree(work_dir, ignore_errors=True)

    def _infer_in(self, rid, tp, material, audio_path, output_path, fps, batch_size, work_dir,
                  stream=False):
        models = self.models
        frames_dir = os.path.join(work_dir, "frames")
        os.makedirs(frames_dir)

        with self.stage(rid, "audio_features", tp):
            chunks = models.audio_chunks(audio_path, fps)
            frames = len(chunks)
        if frames < 1:
            raise RequestError("the audio gives no frames: %s" % audio_path)
        total = int(math.ceil(frames / float(batch_size)))

        # Protocol 2 `stream`: one ffmpeg encodes the frames as they are blended, the audio
        # muxed into each fragment, writing output_path as fragmented MP4 as it goes.
        encoder = self._stream_encoder(audio_path, output_path, fps, frames, work_dir) if stream else None
        blender = _Blender(models, material, frames_dir, models.frame_ext,
                           maxsize=max(2 * batch_size, 32),
                           sink=encoder.stdin if encoder is not None else None)
        blender.start()
        try:
            return self._infer_run(rid, tp, models, material, chunks, frames, total, batch_size,
                                   blender, encoder, frames_dir, audio_path, output_path, fps,
                                   work_dir)
        finally:
            if encoder is not None and encoder.poll() is None:
                encoder.kill()
                encoder.wait()

    def _stream_encoder(self, audio_path, output_path, fps, frames, work_dir):
        codec = {"png": "png", "ppm": "ppm", "jpg": "mjpeg", "jpeg": "mjpeg", "bmp": "bmp"}.get(
            self.models.frame_ext, "png")
        argv = [getattr(self.args, "ffmpeg_path", "ffmpeg"), "-nostdin", "-y", "-v", "error",
                # No probing of the pipe: ffmpeg would read seconds of frames first.
                "-probesize", "32", "-analyzeduration", "0",
                "-f", "image2pipe", "-c:v", codec, "-framerate", str(fps), "-i", "-",
                "-i", audio_path, "-map", "0:v:0", "-map", "1:a:0", "-frames:v", str(frames),
                "-c:v", "libx264", "-tune", "zerolatency", "-g", str(max(1, fps // 2)),
                "-crf", "18", "-pix_fmt", "yuv420p", "-c:a", "aac",
                "-movflags", "+frag_keyframe+empty_moov+default_base_moof",
                "-flush_packets", "1", "-f", "mp4", output_path]
        log("streaming: %s" % " ".join(argv))
        errors = open(os.path.join(work_dir, "encoder.log"), "wb")
        try:
            return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=errors)
        except OSError as exc:
            raise RequestError("ffmpeg: cannot run %s: %s" % (argv[0], exc)) from None
        finally:
            errors.close()

    def _infer_run(self, rid, tp, models, material, chunks, frames, total, batch_size, blender,
                   encoder, frames_dir, audio_path, output_path, fps, work_dir):
        try:
            with self.stage(rid, "unet_inference", tp):
                idx = 0
                done = 0
                t0 = time.monotonic()
                for faces in models.generate_batches(chunks, material.latents, batch_size):
                    # Protocol 2: each batch's UNet + VAE decode time (the generator returns
                    # decoded frames on the CPU, so the GPU work is finished here).
                    self.emit("batch", id=rid, index=done, frames=len(faces),
                              seconds=round(time.monotonic() - t0, 6))
                    if done == 0:
                        self.emit("first_frame", id=rid, t=time.monotonic())
                    for face in faces:
                        blender.put((idx, face))
                        idx += 1
                    done += 1
                    self.emit("progress", id=rid, done=done, total=total)
                    t0 = time.monotonic()
            # Blending runs alongside the UNet (as in Avatar); this stage is what is left
            # of it once the last batch is decoded.
            with self.stage(rid, "blending", tp):
                blender.put(None)
                blender.join()
                if blender.error is not None:
                    raise blender.error
        finally:
            if blender.is_alive():
                # Failed before the end: let the thread drain what is queued, then stop it.
                if blender.error is None:
                    blender.error = RequestError("aborted")
                try:
                    blender.queue.put(None, timeout=10)
                except queue.Full:
                    pass
                blender.join(timeout=10)
        if idx != frames or blender.written != frames:
            raise RequestError("generated %d frames and blended %d, expected %d"
                               % (idx, blender.written, frames))

        if encoder is not None:
            with self.stage(rid, "video_encoding", tp):
                encoder.stdin.close()
                if encoder.wait() != 0:
                    with open(os.path.join(work_dir, "encoder.log"), "rb") as handle:
                        tail = handle.read().decode("utf-8", "replace").strip().splitlines()[-2:]
                    raise RequestError("ffmpeg failed: %s" % (" | ".join(tail) or "exit status %d" % encoder.returncode))
            seconds = self._duration(output_path)
            return {"output": output_path, "frames": frames, "seconds": seconds}

        video_only = os.path.join(work_dir, "video.mp4")
        with self.stage(rid, "video_encoding", tp):
            self._ffmpeg([
                "-r", str(fps), "-f", "image2",
                "-i", os.path.join(frames_dir, "%%08d.%s" % models.frame_ext),
                "-vcodec", "libx264", "-vf", "format=yuv420p", "-crf", "18", video_only,
            ])
        muxed = os.path.join(work_dir, "output.mp4")
        with self.stage(rid, "audio_mux", tp):
            self._ffmpeg([
                "-i", video_only, "-i", audio_path,
                "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac",
                "-movflags", "+faststart", "-f", "mp4", muxed,
            ])
            os.replace(muxed, output_path)
        seconds = self._duration(output_path)
        return {"output": output_path, "frames": frames, "seconds": seconds}

    # ---- ffmpeg -----------------------------------------------------------------------

    def _ffmpeg(self, args):
        argv = [getattr(self.args, "ffmpeg_path", "ffmpeg"), "-nostdin", "-y", "-v", "warning"]
        argv += args
        log("running %s" % " ".join(argv))
        _run(argv, "ffmpeg")

    def _duration(self, path):
        argv = [getattr(self.args, "ffprobe_path", "ffprobe"), "-v", "error",
                "-show_entries", "format=duration", "-of", "default=nw=1:nk=1", path]
        out = _run(argv, "ffprobe")
        try:
            return round(float(out.strip()), 3)
        except ValueError:
            raise RequestError("ffprobe gave no duration for %s" % path) from None


def _run(argv, what):
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    except OSError as exc:
        raise RequestError("cannot run %s: %s" % (what, exc)) from None
    err = proc.stderr.decode("utf-8", "replace").strip()
    if err:
        for line in err.splitlines()[-20:]:
            log("%s: %s" % (what, line))
    if proc.returncode != 0:
        tail = " | ".join(err.splitlines()[-3:]) or "no output"
        raise RequestError("%s exited with status %d: %s" % (what, proc.returncode, tail))
    return proc.stdout.decode("utf-8", "replace")


def _safe(text):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40]


def _write_json_atomically(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, default=str)
    os.replace(tmp, path)


def _clear_material(avatar_dir):
    """Removes what a previous prepare left in avatar_dir (the info file first)."""
    for name in (AVATAR_INFO, COORDS_PKL, LATENTS_PT, MASK_COORDS_PKL):
        try:
            os.remove(os.path.join(avatar_dir, name))
        except FileNotFoundError:
            pass
    for name in (FULL_IMGS, MASK_DIR):
        shutil.rmtree(os.path.join(avatar_dir, name), ignore_errors=True)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="MuseTalk realtime worker (JSON lines on stdin/stdout, "
                    "see docs/worker-protocol.md)")
    p.add_argument("--musetalk-dir", default=".",
                   help="MuseTalk checkout (becomes the working directory; default: .)")
    p.add_argument("--gpu-id", type=int, default=0,
                   help="CUDA device index among the visible devices (default 0)")
    p.add_argument("--version", choices=["v1", "v15"], default="v15")
    p.add_argument("--unet-model-path", default=None,
                   help="default: models/musetalkV15/unet.pth (v15), "
                        "models/musetalk/pytorch_model.bin (v1)")
    p.add_argument("--unet-config", default=None,
                   help="default: models/musetalkV15/musetalk.json (v15), "
                        "models/musetalk/musetalk.json (v1)")
    p.add_argument("--whisper-dir", default="./models/whisper")
    p.add_argument("--vae-type", default="sd-vae")
    p.add_argument("--extra-margin", type=int, default=10,
                   help="v15: pixels added below the face box (default 10)")
    p.add_argument("--parsing-mode", default="jaw", help="v15 face parsing mode (default jaw)")
    p.add_argument("--left-cheek-width", type=int, default=90)
    p.add_argument("--right-cheek-width", type=int, default=90)
    p.add_argument("--audio-padding-length-left", type=int, default=2)
    p.add_argument("--audio-padding-length-right", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=20,
                   help="default batch size when a request has none (default 20)")
    p.add_argument("--fps", type=int, default=25,
                   help="default fps when a request has none (default 25)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="model precision (default float16, like realtime_inference.py)")
    p.add_argument("--ffmpeg-path", default="ffmpeg", help="ffmpeg executable")
    p.add_argument("--ffprobe-path", default="ffprobe", help="ffprobe executable")
    p.add_argument("--avatar-cache", type=int, default=2,
                   help="prepared avatars kept in memory (default 2)")
    p.add_argument("--keep-temp", action="store_true",
                   help="keep each request's temporary frames (debugging)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.fps < 1:
        p.error("--batch-size and --fps must be positive")
    if args.unet_model_path is None:
        args.unet_model_path = ("./models/musetalkV15/unet.pth" if args.version == "v15"
                                else "./models/musetalk/pytorch_model.bin")
    if args.unet_config is None:
        args.unet_config = ("./models/musetalkV15/musetalk.json" if args.version == "v15"
                            else "./models/musetalk/musetalk.json")
    return args


def protocol_stdout():
    """Keeps a private copy of fd 1 for the protocol and points fd 1 at stderr.

    After this, anything written to fd 1 (print(), C libraries, child processes such as
    ffmpeg) lands on stderr; only the returned file reaches the sidecar's stdout pipe.
    The private fd is not inherited by child processes.
    """
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(proto_fd, "w", encoding="utf-8", buffering=1)


def main(argv=None, models_factory=MuseTalkModels):
    proto = protocol_stdout()
    args = parse_args(argv)
    worker = Worker(models_factory(), args)
    stdin = sys.stdin
    try:
        try:
            info, seconds = worker.load()
        except BaseException:  # noqa: B902 - any load failure: no `ready`, non-zero exit
            log("loading the models failed:\n%s" % traceback.format_exc().rstrip())
            return EXIT_LOAD_FAILED
        worker.out = proto
        log("models loaded in %.1f s on CUDA_VISIBLE_DEVICES=%s"
            % (seconds, os.environ.get("CUDA_VISIBLE_DEVICES")))
        worker.emit("ready", worker=info, load_seconds=round(seconds, 3), protocol=2, capabilities=["stream"])
        return worker.serve(stdin, proto)
    except BrokenPipeError:
        log("stdout closed by the sidecar: exiting")
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
