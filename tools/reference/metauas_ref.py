"""PyTorch reference of MetaUAS inference (see shared MODEL_SPEC.md).

Module names match the official checkpoint's state_dict (820 entries), so
`load_state_dict(strict=True)` of an official file or of the synthetic weights works.

CLI (real photos):
    python tools/reference/metauas_ref.py --weights W --prompt P --query Q --size S --out map.npy
writes the float32 anomaly map (S x S) as .npy and prints its max.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_pytorch import EfficientNet

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# Encoder taps: f2..f5 are the outputs of these blocks (index into encoder._blocks).
STAGE_LAST_BLOCK = (5, 9, 21, 31)
ENCODER_CHANNELS = (48, 32, 56, 160, 448)  # f1..f5
# Decoder: (upsampled input channels, skip channels, output channels) per block.
DECODER_BLOCKS = ((896, 320, 256), (256, 112, 128), (128, 32, 64), (64, 48, 64), (64, 0, 48))
ALIGN_CHANNELS = (448, 160, 56)  # alignment level i works on f(5 - i)


# ---------------------------------------------------------------- pre-processing
def preprocess(image_u8: np.ndarray, size: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 HxWx3 -> normalized (1, 3, S, S) tensor, every op in `dtype` (spec section 1)."""
    if image_u8.dtype != np.uint8 or image_u8.ndim != 3 or image_u8.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {image_u8.dtype} {image_u8.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image_u8)).permute(2, 0, 1)[None].to(dtype) / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    mean = torch.tensor(MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def load_image(path: str) -> np.ndarray:
    """Decode to 8-bit RGB (gray replicated, alpha dropped)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy


# ---------------------------------------------------------------- modules
class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze-excitation (reduction 16)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.cSE = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )
        self.sSE = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.cSE(x) + x * self.sSE(x)


class Attention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.attention = SCSE(channels)

    def forward(self, x):
        return self.attention(x)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.has_skip = cskip > 0
        self.conv1 = conv_bn_relu(cin + cskip, cout)
        self.conv2 = conv_bn_relu(cout, cout)
        if self.has_skip:  # block without skip has no attention at all
            self.attention1 = Attention(cin + cskip)
            self.attention2 = Attention(cout)

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.has_skip:
            x = torch.cat([x, skip], dim=1)
            x = self.attention1(x)
        x = self.conv2(self.conv1(x))
        if self.has_skip:
            x = self.attention2(x)
        return x


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([DecoderBlock(*b) for b in DECODER_BLOCKS])


class AlignmentLayer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.dimensionality_reduction = nn.Conv2d(channels, channels // 2, 1)


class SoftAlignment(nn.Module):
    """Soft alignment: softmax over prompt positions of unscaled projected dot products."""

    def __init__(self, channels: int):
        super().__init__()
        self.alignment_layer = AlignmentLayer(channels)

    def forward(self, fq, fp, stats: dict | None = None):
        proj = self.alignment_layer.dimensionality_reduction
        q = proj(fq).flatten(2)  # (1, hidden, N)
        k = proj(fp).flatten(2)
        logits = torch.bmm(q.transpose(1, 2), k)  # (1, Nq, Np), no 1/sqrt(d)
        weights = torch.softmax(logits, dim=-1)
        if stats is not None:
            stats["softmax_max_weight"] = float(weights.max(dim=-1).values.mean())
        aligned = torch.bmm(fp.flatten(2), weights.transpose(1, 2))  # (1, C, Nq)
        return torch.cat([fq, aligned.view_as(fq)], dim=1)


def build_encoder() -> EfficientNet:
    enc = EfficientNet.from_name("efficientnet-b4")
    del enc._fc  # classification layer is not in the checkpoint
    enc.set_swish(memory_efficient=False)
    return enc


class MetaUAS(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = build_encoder()
        self.alignment = nn.ModuleList([SoftAlignment(c) for c in ALIGN_CHANNELS])
        self.decoder = Decoder()
        self.mask_head = nn.Conv2d(48, 1, 1)

    def encode(self, x) -> list:
        """[f1, f2, f3, f4, f5]."""
        enc = self.encoder
        x = enc._swish(enc._bn0(enc._conv_stem(x)))
        feats = [x]
        for idx, block in enumerate(enc._blocks):
            x = block(x, drop_connect_rate=None)
            if idx in STAGE_LAST_BLOCK:
                feats.append(x)
        return feats

    def forward(self, query, prompt, taps: dict | None = None, stats: dict | None = None):
        fq = self.encode(query)
        fp = self.encode(prompt)
        fused = []
        for i, align in enumerate(self.alignment):
            lvl = 4 - i  # f5, f4, f3 -> list index 4, 3, 2
            level_stats = {} if stats is not None else None
            fused.append(align(fq[lvl], fp[lvl], level_stats))
            if stats is not None:
                stats[f"level{i}"] = level_stats["softmax_max_weight"]
        skips = [fused[1], fused[2], fq[1], fq[0], None]
        x = fused[0]
        decs = []
        for block, skip in zip(self.decoder.blocks, skips):
            x = block(x, skip)
            decs.append(x)
        out = torch.sigmoid(self.mask_head(x))
        if taps is not None:
            for j, f in enumerate(fq):
                taps[f"f{j + 1}"] = f
            for i, f in enumerate(fused):
                taps[f"fused{5 - i}"] = f
            for b, d in enumerate(decs):
                taps[f"dec{b}"] = d
            taps["map"] = out
        return out


def new_model(dtype: torch.dtype = torch.float32) -> MetaUAS:
    return MetaUAS().to(dtype).eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- weights
def load_state_dict_file(path: str) -> dict:
    """Tensors of a .safetensors file or a torch.save'd state_dict (.ckpt/.pth)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def model_with_weights(state: dict, dtype: torch.dtype) -> MetaUAS:
    """Model in eval mode; float entries converted (float32 -> float64 widening is exact)."""
    model = MetaUAS()
    tensors = {
        k: (torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v) for k, v in state.items()
    }
    model.load_state_dict(tensors, strict=True)
    return model.to(dtype).eval()


def run_on_files(weights: str, prompt: str, query: str, size: int, dtype=torch.float32) -> np.ndarray:
    """Anomaly map (S x S numpy) for a prompt/query image pair; prints its max."""
    model = model_with_weights(load_state_dict_file(weights), dtype)
    with torch.no_grad():
        q = preprocess(load_image(query), size, dtype)
        p = preprocess(load_image(prompt), size, dtype)
        out = model(q, p)[0, 0].numpy()
    print(f"map max = {float(out.max()):.9g}  (min {float(out.min()):.9g}, mean {float(out.mean()):.9g})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help=".safetensors or torch state_dict (.ckpt)")
    ap.add_argument("--prompt", required=True, help="normal (prompt) image")
    ap.add_argument("--query", required=True, help="query image")
    ap.add_argument("--size", type=int, default=256, help="input side, multiple of 32")
    ap.add_argument("--out", help="write the map here as float32 .npy")
    ap.add_argument("--float64", action="store_true", help="compute in float64 (the map is still saved as float32)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.size <= 0 or args.size % 32 != 0:
        ap.error("--size must be a positive multiple of 32")
    torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.float64 else torch.float32
    out = run_on_files(args.weights, args.prompt, args.query, args.size, dtype)
    if args.out:
        np.save(args.out, out.astype(np.float32))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
