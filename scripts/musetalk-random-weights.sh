#!/usr/bin/env bash
# musetalk-random-weights.sh - fill a MuseTalk checkout's models/ with RANDOM weights.
#
# Usage:
#   scripts/musetalk-random-weights.sh MUSETALK_DIR [--small] [--seed N] [--with-v1]
#                                      [--no-s3fd] [--mmpose-shim DIR] [--force]
#   PYTHON=/path/to/venv/bin/python scripts/musetalk-random-weights.sh ...
#
# What it is for: running the real worker/musetalk_worker.py (and MuseTalk's own
# scripts.inference / scripts.realtime_inference) end to end on CPU or GPU without the
# multi-GB real weights, e.g. on a machine that cannot reach the Hugging Face hub. The
# output is noise, not lip sync: use it to test plumbing, shapes, memory and speed, never
# quality. models/RANDOM_WEIGHTS.json marks such a directory.
#
# What it writes (MuseTalk's layout, as download_weights.sh would; sizes fp32, real geometry):
#   models/musetalkV15/musetalk.json + unet.pth   UNet2DConditionModel, SD-1.x geometry,
#                                                 8 in / 4 out channels, 384-dim
#                                                 cross-attention (~860M params, ~3.4 GB)
#   models/musetalk/{musetalk.json,pytorch_model.bin}   only with --with-v1 (hard links
#                                                 to the v1.5 files: same geometry)
#   models/sd-vae/config.json + diffusion_pytorch_model.bin   AutoencoderKL with
#                                                 sd-vae-ft-mse's config (~84M, ~335 MB)
#   models/whisper/config.json + preprocessor_config.json + pytorch_model.bin
#                                                 whisper-tiny geometry (~38M, ~150 MB)
#   models/face-parse-bisent/79999_iter.pth + resnet18-5c106cde.pth
#                                                 MuseTalk's BiSeNet (19 classes) and
#                                                 torchvision's resnet18
#   models/dwpose/dw-ll_ucoco_384.pth             see "DWPose" below
#   models/RANDOM_WEIGHTS.json                    seed, geometry, library versions
#   musetalk/utils/face_detection/detection/sfd/s3fd.pth   (unless --no-s3fd) the S3FD
#                                                 face detector, where MuseTalk's
#                                                 SFDDetector looks before it downloads
#                                                 from the internet; see "S3FD" below
# Not written: models/syncnet/latentsync_syncnet.pt (used by MuseTalk's training only).
#
# Models are built with the classes MuseTalk loads them into (diffusers, transformers,
# MuseTalk's own BiSeNet and s3fd classes imported from MUSETALK_DIR, never copied),
# initialised from --seed (default 1234: the same seed gives the same weights with the same
# library versions), and saved as plain {name: tensor} state dicts. The configs that
# normally come from the hub (musetalk.json, the VAE's, whisper-tiny's) are written by hand
# in scripts/musetalk_random_weights.py with the real values. Existing files are kept
# unless --force, or unless their config says another geometry (--small vs default).
#
# --small: UNet block_out_channels [32,64,64,64] (instead of [320,640,1280,1280]) and VAE
# block_out_channels [32,64,64,64] (instead of [128,256,512,512]); everything else, and
# every tensor shape passed between the models (256x256 crops, 4x32x32 latents, 8 UNet
# input channels, 384-dim whisper features), is the real one. musetalk.json and the VAE's
# config.json then say the small geometry, so MuseTalk's loaders build the small models.
# Whisper, BiSeNet and S3FD are always full size. Default: real geometry.
#
# DWPose: MuseTalk's preprocessing loads it with mmpose (RTMPose-l, whose CSPNeXt backbone
# is mmdet's), which needs mmpose + mmdet + mmcv 2.0/2.1 with compiled ops. Where
# `mmpose.apis` imports, the checkpoint is the RTMPose-l model built from MuseTalk's config
# with random init. Otherwise it is a PLACEHOLDER: a valid mmengine checkpoint with an empty
# state_dict (mmengine loads checkpoints non-strictly, so a later mmpose install runs it
# with the model's own random init). Without mmpose, `import musetalk.utils.preprocessing`
# (and so the worker's load) fails; --mmpose-shim DIR writes a stand-in `mmpose` package
# (init_model / inference_topdown / merge_data_samples only) that returns FIXED face
# keypoints centred in each frame: put DIR on PYTHONPATH (only where mmpose is absent) to
# run prepare end to end. That stand-in is not DWPose.
#
# S3FD: random, except its confidence heads (zeroed, with a "face" bias on the stride-32
# head and a "background" bias on the others) and that head's box regression (zeroed), so
# every frame gets detections (the head's 128x128 anchors). A fully random detector finds
# "no face" at random and the worker fails prepare.
#
# BiSeNet: random, except its final classifier, set to say "skin" (class 1) wherever its
# features are non-zero, so that MuseTalk's masks cover the lower face and the generated
# mouths reach the video (a random classifier gives empty masks: the output would be the
# untouched source frames).
#
# torch >= 2.6 (`torch.load` defaults to weights_only=True): every file written here is a
# plain tensor dict, so MuseTalk's unmodified torch.load calls (UNet, BiSeNet, resnet18,
# S3FD) and diffusers/transformers' .bin loaders accept them. The REAL dw-ll_ucoco_384.pth
# may not load with mmengine's torch.load under torch >= 2.6 (not tested here).
#
# Requirements (in the Python that runs it, the one MuseTalk runs with): torch,
# torchvision, diffusers, transformers (plus what MuseTalk's face_parsing package imports:
# opencv-python(-headless), numpy, Pillow). diffusers is pure Python: where it is absent
# (e.g. a GPU machine with only torch/transformers), carry MuseTalk's pin as a wheel,
# `pip download --no-deps diffusers==0.30.2` -> diffusers-0.30.2-py3-none-any.whl, and
# `pip install --no-deps` it there (it also needs huggingface_hub, safetensors, regex,
# Pillow, importlib_metadata, which transformers already brings). Verified with
# torch 2.11.0 (the PyPI build, run on CPU), torchvision 0.26.0, diffusers 0.30.2,
# transformers 5.25.0, huggingface_hub 2.4.0, numpy 1.26.4, opencv-python-headless
# 4.9.0.80, librosa 0.11.0, Python 3.11.
#
# Verified there (2 CPU cores, no GPU): real geometry builds in ~60 s (4 GB peak RSS) and
# loads with load_all_model (UNet 849.9M params, VAE 83.7M, whisper 37.8M) for one UNet
# forward + VAE decode; --small builds in ~12 s and runs the real worker's prepare of a 2 s
# 256x256 video + infer of 3 s audio (mp4 of 3.000 s) and `python -m scripts.inference`,
# with --mmpose-shim's stand-in on PYTHONPATH. Not run: GPU/fp16, real mmpose.
#
# Then, for example (CPU; drop PYTHONPATH where mmpose is installed):
#   scripts/musetalk-random-weights.sh /opt/MuseTalk --small --mmpose-shim /opt/mmpose-shim
#   PYTHONPATH=/opt/mmpose-shim python3 worker/musetalk_worker.py \
#       --musetalk-dir /opt/MuseTalk --dtype float32
#   cd /opt/MuseTalk && PYTHONPATH=/opt/mmpose-shim python3 -m scripts.inference \
#       --inference_config my.yaml --unet_config models/musetalkV15/musetalk.json \
#       --unet_model_path models/musetalkV15/unet.pth --version v15
set -euo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  [[ $# -lt 1 ]] && exit 2 || exit 0
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

if ! "$python" -c 'import torch, torchvision, diffusers, transformers' 2>/dev/null; then
  echo "musetalk-random-weights: $python lacks one of torch, torchvision, diffusers, transformers" >&2
  "$python" - <<'EOF' >&2 || true
import importlib
for name in ("torch", "torchvision", "diffusers", "transformers"):
    try:
        module = importlib.import_module(name)
        print("  %-12s %s" % (name, getattr(module, "__version__", "?")))
    except Exception as exc:
        print("  %-12s MISSING (%s)" % (name, exc))
EOF
  echo "  diffusers is pure Python: pip download --no-deps diffusers==0.30.2 and install the wheel" >&2
  exit 1
fi

exec "$python" "$here/musetalk_random_weights.py" "$@"
