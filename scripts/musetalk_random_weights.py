#!/usr/bin/env python3
"""Fills a MuseTalk checkout's models/ with RANDOM weights in MuseTalk's real layout.

Entry point and full documentation: scripts/musetalk-random-weights.sh (read its header).

    python3 scripts/musetalk_random_weights.py MUSETALK_DIR [--small] [--seed N]
        [--with-v1] [--no-s3fd] [--mmpose-shim DIR] [--force]

Every model is built with the class MuseTalk itself loads it into (diffusers'
UNet2DConditionModel / AutoencoderKL, transformers' Whisper, MuseTalk's own BiSeNet and
S3FD classes, torchvision's resnet18), randomly initialised from a fixed seed, and saved
as a plain state dict (tensors only, so torch>=2.6's `torch.load(weights_only=True)`
default accepts every file). Configs that normally come from the Hugging Face hub are
written here by hand with the real geometry.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

# ---------------------------------------------------------------------------------------
# Real configs (hand-written: normally downloaded from the hub)
# ---------------------------------------------------------------------------------------

# TMElyralab/MuseTalk musetalkV15/musetalk.json (and musetalk/musetalk.json for v1):
# an SD-1.x UNet2DConditionModel with 8 input channels (masked + reference latents) and
# 384-dim cross-attention (whisper-tiny encoder features). ~860M parameters, 3.4 GB fp32.
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

# stabilityai/sd-vae-ft-mse config.json (no scaling_factor: diffusers' default 0.18215).
# 3 downsamplings: a 256x256 face crop becomes a 4x32x32 latent. ~84M parameters.
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# openai/whisper-tiny geometry (MuseTalk uses the encoder only: 4 layers, d_model 384,
# 80 mel bins, 1500 positions = 30 s at 50 frames/s). ~38M parameters.
WHISPER_CONFIG = {
    "activation_dropout": 0.0,
    "activation_function": "gelu",
    "attention_dropout": 0.0,
    "begin_suppress_tokens": [220, 50257],
    "bos_token_id": 50257,
    "d_model": 384,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "decoder_layerdrop": 0.0,
    "decoder_layers": 4,
    "decoder_start_token_id": 50258,
    "dropout": 0.0,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "encoder_layerdrop": 0.0,
    "encoder_layers": 4,
    "eos_token_id": 50257,
    "init_std": 0.02,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "num_hidden_layers": 4,
    "num_mel_bins": 80,
    "pad_token_id": 50257,
    "scale_embedding": False,
    "use_cache": True,
    "vocab_size": 51865,
}

# --small: narrower channels, same structure (block types, layer counts, 8x VAE
# downsampling, 8 -> 4 UNet channels, 384-dim cross-attention), so every shape MuseTalk
# sees between the models is the real one.
SMALL_UNET_CHANNELS = [32, 64, 64, 64]
SMALL_VAE_CHANNELS = [32, 64, 64, 64]


def log(msg):
    sys.stderr.write("musetalk-random-weights: %s\n" % msg)
    sys.stderr.flush()


def size_of(path):
    return os.path.getsize(path) / 1e6


def write_json(path, data):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def save_state_dict(torch, module, path):
    """A plain {name: tensor} dict (contiguous CPU tensors): loadable with weights_only."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    params = sum(p.numel() for p in module.parameters())
    log("  wrote %s (%.1f MB, %.1fM parameters)" % (path, size_of(path), params / 1e6))
    return params


def exists_all(paths, force, config_path=None, config=None):
    if force:
        return False
    if config_path is not None and os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as handle:
            if json.load(handle) != config:
                log("  %s has another geometry: rebuilding" % config_path)
                return False
    if all(os.path.exists(p) for p in paths):
        log("  exists, kept (use --force to rebuild): %s" % ", ".join(paths))
        return True
    return False


def load_module_from_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------

def build_unet(torch, models, subdir, weights_name, small, seed, force):
    from diffusers import UNet2DConditionModel
    out = os.path.join(models, subdir)
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "musetalk.json")
    w_path = os.path.join(out, weights_name)
    log("UNet (%s) -> %s" % ("small" if small else "real geometry", out))
    config = dict(UNET_CONFIG)
    if small:
        config["block_out_channels"] = list(SMALL_UNET_CHANNELS)
    if exists_all([cfg_path, w_path], force, cfg_path, config):
        return
    write_json(cfg_path, config)
    torch.manual_seed(seed)
    # Exactly how musetalk/models/unet.py builds it: UNet2DConditionModel(**json).
    with open(cfg_path, encoding="utf-8") as handle:
        model = UNet2DConditionModel(**json.load(handle))
    save_state_dict(torch, model, w_path)
    del model


def link_or_copy(src, dst):
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        import shutil
        shutil.copyfile(src, dst)


def build_unet_v1(torch, models, force):
    """v1 (models/musetalk/): same UNet geometry; hard-links the v1.5 files."""
    out = os.path.join(models, "musetalk")
    os.makedirs(out, exist_ok=True)
    cfg, weights = os.path.join(out, "musetalk.json"), os.path.join(out, "pytorch_model.bin")
    log("UNet v1 -> %s (same random weights as musetalkV15)" % out)
    with open(os.path.join(models, "musetalkV15", "musetalk.json"), encoding="utf-8") as handle:
        v15_config = json.load(handle)
    if exists_all([cfg, weights], force, cfg, v15_config):
        return
    link_or_copy(os.path.join(models, "musetalkV15", "musetalk.json"), cfg)
    link_or_copy(os.path.join(models, "musetalkV15", "unet.pth"), weights)
    log("  wrote %s (%.1f MB)" % (weights, size_of(weights)))


def build_vae(torch, models, small, seed, force):
    from diffusers import AutoencoderKL
    out = os.path.join(models, "sd-vae")
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "config.json")
    w_path = os.path.join(out, "diffusion_pytorch_model.bin")
    log("VAE (%s) -> %s" % ("small" if small else "real geometry", out))
    config = dict(VAE_CONFIG)
    if small:
        config["block_out_channels"] = list(SMALL_VAE_CHANNELS)
    if exists_all([cfg_path, w_path], force, cfg_path, config):
        return
    write_json(cfg_path, config)
    torch.manual_seed(seed)
    model = AutoencoderKL.from_config(AutoencoderKL.load_config(out))
    save_state_dict(torch, model, w_path)
    del model


def build_whisper(torch, models, seed, force):
    from transformers import WhisperConfig, WhisperFeatureExtractor, \
        WhisperForConditionalGeneration
    out = os.path.join(models, "whisper")
    os.makedirs(out, exist_ok=True)
    w_path = os.path.join(out, "pytorch_model.bin")
    paths = [os.path.join(out, "config.json"), os.path.join(out, "preprocessor_config.json"),
             w_path]
    log("Whisper (whisper-tiny geometry) -> %s" % out)
    if exists_all(paths, force):
        return
    config = WhisperConfig(**WHISPER_CONFIG)
    config.architectures = ["WhisperForConditionalGeneration"]
    config.save_pretrained(out)
    # whisper-tiny's preprocessor: 80 mel bins, 16 kHz, hop 160, n_fft 400, 30 s chunks
    # (WhisperFeatureExtractor's defaults are exactly these).
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160,
                            chunk_length=30, n_fft=400).save_pretrained(out)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    # The hub checkpoint's keys are "model.encoder.*", "model.decoder.*" (proj_out is
    # tied to the token embedding and not stored): save the same.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.startswith("proj_out.")}
    tmp = w_path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, w_path)
    params = sum(p.numel() for p in model.parameters())
    log("  wrote %s (%.1f MB, %.1fM parameters)" % (w_path, size_of(w_path), params / 1e6))


def build_face_parsing(torch, models, musetalk_dir, seed, force):
    import torchvision
    out = os.path.join(models, "face-parse-bisent")
    os.makedirs(out, exist_ok=True)
    resnet_path = os.path.join(out, "resnet18-5c106cde.pth")
    bisenet_path = os.path.join(out, "79999_iter.pth")
    log("face parsing (BiSeNet + resnet18) -> %s" % out)
    if exists_all([resnet_path, bisenet_path], force):
        return
    torch.manual_seed(seed)
    # resnet18-5c106cde.pth is torchvision's resnet18 state dict (fc included).
    save_state_dict(torch, torchvision.models.resnet18(weights=None), resnet_path)
    # MuseTalk's own BiSeNet (no spatial path, 19 classes), which loads the resnet above.
    from musetalk.utils.face_parsing.model import BiSeNet
    torch.manual_seed(seed + 1)
    net = BiSeNet(resnet_path, n_classes=19)
    # Its final 1x1 classifier is set to say class 1 ("skin") wherever any feature is
    # non-zero (its inputs come after a ReLU): a random classifier rarely says 1 or 11-13,
    # the classes MuseTalk's masks are made of, so the masks would be empty and the
    # blended video the untouched source frames, the UNet's output never reaching it.
    with torch.no_grad():
        head = net.conv_out.conv_out.weight
        head.zero_()
        head[1].fill_(0.01)
    save_state_dict(torch, net, bisenet_path)


def build_dwpose(torch, models, musetalk_dir, seed, force):
    """dw-ll_ucoco_384.pth: built with mmpose when it imports; else a placeholder.

    The placeholder is a valid mmengine checkpoint with an EMPTY state_dict: mmengine's
    load_checkpoint is non-strict, so with mmpose + mmdet installed the RTMPose-l model
    keeps its own random init (and logs the missing keys).
    """
    out = os.path.join(models, "dwpose")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "dw-ll_ucoco_384.pth")
    log("DWPose -> %s" % path)
    if exists_all([path], force):
        return "kept"
    config = os.path.join(musetalk_dir, "musetalk", "utils", "dwpose",
                          "rtmpose-l_8xb32-270e_coco-ubody-wholebody-384x288.py")
    try:
        from mmpose.apis import init_model  # needs mmpose + mmdet (CSPNeXt) + mmcv
    except Exception as exc:  # noqa: BLE001 - any import failure means: no mmpose here
        log("  mmpose is not importable (%s: %s): writing a placeholder checkpoint"
            % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""))
        torch.save({"meta": {"random_weights": True, "placeholder": True}, "state_dict": {}},
                   path)
        log("  wrote %s (placeholder, empty state_dict)" % path)
        return "placeholder"
    torch.manual_seed(seed)
    model = init_model(config, None, device="cpu")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"meta": {"random_weights": True}, "state_dict": state}, path)
    log("  wrote %s (%.1f MB, built with mmpose)" % (path, size_of(path)))
    return "mmpose"


def build_s3fd(torch, musetalk_dir, seed, force):
    """S3FD face detector weights where MuseTalk's SFDDetector looks before downloading.

    Its confidence heads are zeroed, with a bias for class "face" on the stride-32 head
    and one for "background" on the others, and that head's box regression is zeroed: every
    frame yields detections (score 0.98, boxes = the head's 128x128 anchors). A fully random
    S3FD gives arbitrary scores and boxes, so prepare would fail at random with "no face
    detected". Every other weight is random.
    """
    sfd_dir = os.path.join(musetalk_dir, "musetalk", "utils", "face_detection", "detection",
                           "sfd")
    path = os.path.join(sfd_dir, "s3fd.pth")
    log("S3FD -> %s" % path)
    if exists_all([path], force):
        return
    net_s3fd = load_module_from_file("_musetalk_net_s3fd", os.path.join(sfd_dir, "net_s3fd.py"))
    torch.manual_seed(seed)
    model = net_s3fd.s3fd()
    with torch.no_grad():
        for name, module in model.named_children():
            if name == "fc7_mbox_loc":
                module.weight.zero_()  # boxes = the anchors themselves
                module.bias.zero_()
            elif name.endswith("_mbox_conf"):
                module.weight.zero_()
                module.bias.zero_()
                if name == "fc7_mbox_conf":
                    module.bias.copy_(torch.tensor([-2.0, 2.0]))
                else:
                    # background wins: scores 0.12, filtered out by the 0.5 threshold
                    module.bias[0] = 2.0
    save_state_dict(torch, model, path)


# A stand-in for mmpose (only the two calls MuseTalk's preprocessing makes), for machines
# where mmpose + mmdet + mmcv cannot be installed. Fixed, plausible 133-point whole-body
# keypoints: the 68 face points (23..90) on a face centred in the image.
MMPOSE_SHIM = {
    "mmpose/__init__.py": '''"""NOT mmpose: a stand-in written by scripts/musetalk_random_weights.py."""
__version__ = "0.0.0+musetalk-random-weights-shim"
''',
    "mmpose/apis/__init__.py": '''import numpy as np


class _Model:
    def __init__(self, config, checkpoint, device):
        self.config, self.checkpoint, self.device = config, checkpoint, device


def init_model(config, checkpoint=None, device="cpu", **_):
    return _Model(config, checkpoint, device)


class _Instances:
    def __init__(self, keypoints):
        self.keypoints = keypoints


class _Sample:
    def __init__(self, keypoints):
        self.pred_instances = _Instances(keypoints)


def inference_topdown(model, img, *_, **__):
    h, w = img.shape[:2]
    kp = np.zeros((1, 133, 2), dtype=np.float32)
    kp[0, :, 0], kp[0, :, 1] = w * 0.5, h * 0.5
    face = np.zeros((68, 2), dtype=np.float32)
    # jaw 0..16: a U from ear to ear through the chin
    t = np.linspace(0.0, np.pi, 17)
    face[0:17, 0] = w * (0.5 - 0.2 * np.cos(t))
    face[0:17, 1] = h * (0.45 + 0.3 * np.sin(t))
    face[17:27, 0] = np.linspace(w * 0.33, w * 0.67, 10)   # brows
    face[17:27, 1] = h * 0.35
    face[27:31, 0] = w * 0.5                                # nose bridge 27..30
    face[27:31, 1] = np.linspace(h * 0.40, h * 0.55, 4)
    face[31:36, 0] = np.linspace(w * 0.44, w * 0.56, 5)     # nostrils
    face[31:36, 1] = h * 0.58
    face[36:48, 0] = np.concatenate([np.linspace(w * 0.36, w * 0.45, 6),
                                     np.linspace(w * 0.55, w * 0.64, 6)])  # eyes
    face[36:48, 1] = h * 0.42
    u = np.linspace(0.0, 2 * np.pi, 20, endpoint=False)     # mouth 48..67
    face[48:68, 0] = w * (0.5 + 0.1 * np.cos(u))
    face[48:68, 1] = h * (0.66 + 0.04 * np.sin(u))
    kp[0, 23:91] = face
    return [_Sample(kp)]
''',
    "mmpose/structures/__init__.py": '''def merge_data_samples(samples):
    return samples[0]
''',
}


def write_mmpose_shim(directory):
    for rel, text in MMPOSE_SHIM.items():
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    log("mmpose stand-in written to %s (put it on PYTHONPATH only where mmpose is absent)"
        % directory)


# ---------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="MuseTalk models/ with random weights "
                                            "(see scripts/musetalk-random-weights.sh)")
    p.add_argument("musetalk_dir", help="MuseTalk checkout; models/ is created inside")
    p.add_argument("--small", action="store_true",
                   help="narrower UNet and VAE channels (fast CPU runs); default: real geometry")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--with-v1", action="store_true",
                   help="also models/musetalk/ (v1: musetalk.json + pytorch_model.bin)")
    p.add_argument("--no-s3fd", action="store_true",
                   help="do not write musetalk/utils/face_detection/detection/sfd/s3fd.pth")
    p.add_argument("--mmpose-shim", metavar="DIR",
                   help="also write a stand-in `mmpose` package into DIR (see the header)")
    p.add_argument("--force", action="store_true", help="rebuild files that exist")
    args = p.parse_args(argv)

    musetalk_dir = os.path.abspath(args.musetalk_dir)
    if not os.path.isfile(os.path.join(musetalk_dir, "musetalk", "models", "unet.py")):
        p.error("%s is not a MuseTalk checkout (no musetalk/models/unet.py)" % musetalk_dir)
    # MuseTalk's modules are imported from the checkout (never copied).
    sys.path.insert(0, musetalk_dir)
    models = os.path.join(musetalk_dir, "models")
    os.makedirs(models, exist_ok=True)

    import torch
    torch.set_grad_enabled(False)
    started = time.monotonic()
    build_unet(torch, models, "musetalkV15", "unet.pth", args.small, args.seed, args.force)
    if args.with_v1:
        build_unet_v1(torch, models, args.force)
    build_vae(torch, models, args.small, args.seed + 1, args.force)
    build_whisper(torch, models, args.seed + 2, args.force)
    build_face_parsing(torch, models, musetalk_dir, args.seed + 3, args.force)
    dwpose = build_dwpose(torch, models, musetalk_dir, args.seed + 5, args.force)
    if not args.no_s3fd:
        build_s3fd(torch, musetalk_dir, args.seed + 6, args.force)
    if args.mmpose_shim:
        write_mmpose_shim(os.path.abspath(args.mmpose_shim))

    import diffusers
    import transformers
    manifest = {
        "random_weights": True,
        "note": "RANDOM weights in MuseTalk's layout, made by "
                "scripts/musetalk_random_weights.py: output is noise, not lip sync",
        "geometry": "small" if args.small else "real",
        "seed": args.seed,
        "dwpose": dwpose,
        "s3fd": not args.no_s3fd,
        "v1": bool(args.with_v1),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    write_json(os.path.join(models, "RANDOM_WEIGHTS.json"), manifest)
    log("done in %.1f s: %s" % (time.monotonic() - started, json.dumps(manifest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
