#!/usr/bin/env python3
"""Write the decoder corpus of tests/fixtures/images and what Pillow makes of each file.

For every file, `pillow.tsv` records what the upstream MetaUAS loader,
`Image.open(path).convert('RGB')`, gives: the size and the SHA-256 of the RGB bytes (HWC), or
`error` and Pillow's message when Pillow refuses the file. `tests/image_corpus.rs` asserts that
metauas decodes every file to exactly those bytes, and refuses the files Pillow refuses.

Encoders: Pillow (with its bundled libjpeg-turbo, libpng/zlib, libtiff), libjpeg-turbo's
`cjpeg` and `libturbojpeg` from Debian (subsamplings Pillow cannot write, restart intervals,
arithmetic coding, YCCK), libtiff's `tiffcp` (tiles, compressions), and hand-written PNG and
TIFF writers for what none of them writes (16-bit RGB PNG, Adam7 interlacing, 16-bit RGB
TIFF). Needs: Pillow, numpy, opencv-python (the JET LUT) and, from Debian,
libjpeg-turbo-progs, libturbojpeg0 and libtiff-tools.

    python tools/reference/make_image_fixtures.py [--out tests/fixtures/images]
"""
import argparse
import ctypes
import hashlib
import io
import os
import struct
import subprocess
import tempfile
import zlib

import cv2
import numpy as np
import PIL
from PIL import Image, features

OUT = "tests/fixtures/images"


def smooth(h, w, seed=0, texture=12.0):
    """A camera-like picture: smooth colour gradients, a few shapes, mild texture."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 40 + 170 * x / max(w - 1, 1)
    g = 60 + 150 * y / max(h - 1, 1)
    b = 128 + 70 * np.sin(x / 7.0 + seed) * np.cos(y / 9.0)
    img = np.stack([r, g, b], -1)
    for _ in range(3):
        cy, cx, rad = rs.randint(0, h), rs.randint(0, w), rs.randint(2, max(3, min(h, w) // 3))
        disk = (y - cy) ** 2 + (x - cx) ** 2 < rad**2
        img[disk] = rs.randint(0, 256, size=3)
    img += rs.randn(h, w, 3) * texture
    return np.clip(img, 0, 255).astype(np.uint8)


def noise(h, w, channels, seed, high=256, dtype=np.uint8):
    rs = np.random.RandomState(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rs.randint(0, high, size=shape).astype(dtype)


def png_chunk(kind, body):
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_by_hand(arr, bit_depth, color_type, interlaced=False):
    """PNG with filter 0 rows; `arr` is (H, W, C) of uint8 or uint16 samples."""
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"

    def rows(sub):
        return b"".join(b"\x00" + sub[y].astype(dtype).tobytes() for y in range(sub.shape[0]))

    if interlaced:
        # Adam7: (x0, y0, dx, dy) of the seven passes.
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                  (1, 0, 2, 2), (0, 1, 1, 2)]
        raw = b"".join(rows(arr[y0::dy, x0::dx]) for x0, y0, dx, dy in passes
                       if arr[y0::dy, x0::dx].size)
    else:
        raw = rows(arr)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 1 if interlaced else 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b""))


def tiff_rgb16_by_hand(arr):
    """Little-endian, uncompressed, one strip, 16-bit RGB."""
    h, w, _ = arr.shape
    pixels = arr.astype("<u2").tobytes()
    entries = [  # tag, type (3 short, 4 long), count, value
        (256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, None), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(pixels)),
        (284, 3, 1, 1),
    ]
    ifd_at = 8
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at = ifd_at + ifd_size
    data_at = bits_at + 6
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_at))
    out += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if tag == 258:
            value = bits_at
        if tag == 273:
            value = data_at
        fmt = "<HHII" if kind == 4 or count > 1 else "<HHIHH"
        out += struct.pack(fmt, tag, kind, count, value) if fmt == "<HHII" else struct.pack(
            fmt, tag, kind, count, value, 0)
    out += struct.pack("<I", 0)
    out += struct.pack("<HHH", 16, 16, 16)
    out += pixels
    return bytes(out)


def turbojpeg_ycck(cmyk, quality=90):
    """A YCCK JPEG: TurboJPEG converts packed CMYK input to YCCK when it compresses."""
    lib = ctypes.CDLL("libturbojpeg.so.0")
    lib.tjInitCompress.restype = ctypes.c_void_p
    handle = lib.tjInitCompress()
    h, w, _ = cmyk.shape
    buf = ctypes.POINTER(ctypes.c_ubyte)()
    size = ctypes.c_ulong(0)
    src = np.ascontiguousarray(cmyk)
    tjpf_cmyk, tjsamp_420 = 11, 2
    rc = lib.tjCompress2(ctypes.c_void_p(handle), src.ctypes.data_as(ctypes.c_void_p), w, 0, h,
                         tjpf_cmyk, ctypes.byref(buf), ctypes.byref(size), tjsamp_420, quality, 0)
    assert rc == 0, "tjCompress2 failed"
    data = ctypes.string_at(buf, size.value)
    lib.tjFree(buf)
    lib.tjDestroy(ctypes.c_void_p(handle))
    return data


def ppm(arr):
    h, w = arr.shape[:2]
    if arr.ndim == 2:
        return b"P5\n%d %d\n255\n" % (w, h) + arr.tobytes()
    return b"P6\n%d %d\n255\n" % (w, h) + arr.tobytes()


def cjpeg(arr, *args):
    with tempfile.NamedTemporaryFile(suffix=".ppm") as f:
        f.write(ppm(arr))
        f.flush()
        return subprocess.run(["cjpeg", *args, f.name], check=True, capture_output=True).stdout


def tiffcp(data, *args):
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.tif"), os.path.join(tmp, "out.tif")
        with open(src, "wb") as f:
            f.write(data)
        subprocess.run(["tiffcp", *args, src, dst], check=True)
        with open(dst, "rb") as f:
            return f.read()


def pil_bytes(img, fmt, **kw):
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def exif_with_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def corpus():
    """(file name, bytes, what it covers)."""
    files = []

    def add(name, data, note):
        files.append((name, data, note))

    rgb = Image.fromarray(smooth(217, 333, seed=1, texture=3.0))
    for samp, tag in [(0, "444"), (1, "422"), (2, "420")]:
        add(f"pil_{tag}_333x217.jpg", pil_bytes(rgb, "JPEG", quality=90, subsampling=samp),
            f"Pillow baseline {tag}, odd size")
    add("pil_progressive_420_333x217.jpg",
        pil_bytes(rgb, "JPEG", quality=90, progressive=True), "Pillow progressive 4:2:0")
    add("pil_progressive_444_333x217.jpg",
        pil_bytes(rgb, "JPEG", quality=85, progressive=True, subsampling=0),
        "Pillow progressive 4:4:4")
    add("pil_optimized_q60.jpg", pil_bytes(rgb, "JPEG", quality=60, optimize=True),
        "optimized Huffman tables, low quality")
    add("pil_1x1.jpg", pil_bytes(Image.fromarray(smooth(1, 1, seed=2)), "JPEG"), "1 x 1")
    add("pil_17x9.jpg", pil_bytes(Image.fromarray(smooth(9, 17, seed=3)), "JPEG", quality=95),
        "17 x 9, partial MCUs")
    add("pil_17x9_progressive.jpg",
        pil_bytes(Image.fromarray(smooth(9, 17, seed=3)), "JPEG", progressive=True),
        "17 x 9 progressive")
    gray = Image.fromarray(smooth(97, 161, seed=4, texture=4.0)[:, :, 1])
    add("pil_gray_161x97.jpg", pil_bytes(gray, "JPEG", quality=90), "grayscale")
    add("pil_gray_progressive.jpg", pil_bytes(gray, "JPEG", progressive=True),
        "grayscale progressive")
    cmyk = Image.fromarray(noise(40, 48, 4, seed=5) // 2 + smooth(40, 48, 5)[:, :, :1] // 2,
                           "CMYK")
    add("pil_cmyk_adobe.jpg", pil_bytes(cmyk, "JPEG", quality=90), "CMYK with an Adobe marker")
    add("pil_exif_orientation6.jpg",
        pil_bytes(Image.fromarray(smooth(24, 40, seed=6)), "JPEG",
                  exif=exif_with_orientation(6)),
        "EXIF orientation 6 (ignored by Image.open)")
    add("pil_restart_blocks.jpg",
        pil_bytes(rgb, "JPEG", quality=90, restart_marker_blocks=3), "restart every 3 MCUs")
    frame = Image.fromarray(smooth(768, 1024, seed=7, texture=3.0))
    add("pil_frame_1024x768.jpg", pil_bytes(frame, "JPEG", quality=75),
        "a camera-sized frame, 4:2:0")

    src = smooth(97, 161, seed=8, texture=4.0)
    add("cjpeg_440_161x97.jpg", cjpeg(src, "-quality", "90", "-sample", "1x2"),
        "cjpeg 4:4:0")
    add("cjpeg_411_161x97.jpg", cjpeg(src, "-quality", "90", "-sample", "4x1"),
        "cjpeg 4:1:1")
    add("cjpeg_restart_rows.jpg", cjpeg(src, "-quality", "90", "-restart", "1"),
        "cjpeg restart every MCU row")
    add("cjpeg_progressive_422.jpg",
        cjpeg(src, "-quality", "88", "-progressive", "-sample", "2x1"), "cjpeg progressive 4:2:2")
    add("cjpeg_arithmetic.jpg", cjpeg(src, "-quality", "90", "-arithmetic"),
        "arithmetic coding")
    add("cjpeg_rgb_colorspace.jpg", cjpeg(src, "-quality", "90", "-rgb"),
        "RGB JPEG (Adobe transform 0)")
    add("cjpeg_gray_from_rgb.jpg", cjpeg(src, "-quality", "90", "-grayscale"), "cjpeg gray")
    ycck_src = np.dstack([noise(40, 48, 3, 9) // 3 + 80, noise(40, 48, 1, 10)[:, :, None] // 4])
    add("turbojpeg_ycck.jpg", turbojpeg_ycck(ycck_src), "YCCK (Adobe transform 2)")

    base = pil_bytes(rgb, "JPEG", quality=90)
    prog = pil_bytes(rgb, "JPEG", quality=90, progressive=True)
    add("truncated_40pct.jpg", base[: int(len(base) * 0.4)], "cut at 40% (refused)")
    add("truncated_progressive_70pct.jpg", prog[: int(len(prog) * 0.7)],
        "progressive cut at 70% (refused)")
    add("truncated_no_eoi.jpg", base[:-2], "only the EOI missing (refused)")
    add("truncated_then_eoi.jpg", base[: int(len(base) * 0.4)] + b"\xff\xd9",
        "cut, then an EOI (Pillow decodes it, filling the rest)")
    corrupt = bytearray(base)
    for at in range(len(base) // 2, len(base) // 2 + 40, 7):
        corrupt[at] = (corrupt[at] + 0x55) % 256 if corrupt[at] != 0xFF else 0xFF
    add("corrupt_entropy.jpg", bytes(corrupt), "flipped entropy bytes (decoded with warnings)")
    garbage = base[:300] + b"\x00" * 40 + base[300:]
    add("extraneous_bytes.jpg", garbage, "garbage between segments")

    # PNG
    add("gray8.png", pil_bytes(Image.fromarray(noise(12, 16, 1, 1), "L"), "PNG"), "gray 8-bit")
    add("gray1.png", pil_bytes(Image.fromarray(noise(12, 16, 1, 12) > 127), "PNG"), "1-bit")
    gray16 = noise(12, 16, 1, 8, high=65536, dtype=np.uint32).astype(np.uint16)
    gray16[0, :4] = [0, 1, 255, 256]
    add("gray16.png", pil_bytes(Image.fromarray(gray16), "PNG"), "16-bit gray (clipped)")
    la = np.dstack([noise(12, 16, 1, 2), noise(12, 16, 1, 3)])
    add("gray_alpha.png", pil_bytes(Image.fromarray(la, "LA"), "PNG"), "gray + alpha")
    la16 = noise(12, 16, 2, 13, high=65536, dtype=np.uint32).astype(np.uint16)
    add("gray_alpha16.png", png_by_hand(la16, 16, 4), "16-bit gray + alpha")
    add("rgba.png", pil_bytes(Image.fromarray(noise(12, 16, 4, 4), "RGBA"), "PNG"), "RGBA")
    rgba16 = noise(12, 16, 4, 14, high=65536, dtype=np.uint32).astype(np.uint16)
    add("rgba16.png", png_by_hand(rgba16, 16, 6), "16-bit RGBA")
    rgb16 = noise(12, 16, 3, 7, high=65536, dtype=np.uint32).astype(np.uint16)
    add("rgb16.png", png_by_hand(rgb16, 16, 2), "16-bit RGB")
    pal = Image.frombytes("P", (16, 12), noise(12, 16, 1, 5, high=16).tobytes())
    pal.putpalette(noise(16, 1, 3, 6).reshape(-1).tolist())
    add("palette_trns.png", pil_bytes(pal, "PNG", transparency=3), "palette with tRNS")
    add("palette4.png", pil_bytes(pal, "PNG", bits=4), "4-bit palette")
    add("interlaced_rgb.png", png_by_hand(noise(13, 19, 3, 15), 8, 2, interlaced=True),
        "Adam7 interlaced RGB")
    add("interlaced_gray16.png",
        png_by_hand(noise(13, 19, 1, 16, high=400, dtype=np.uint32).astype(np.uint16)[:, :, None],
                    16, 0, interlaced=True), "Adam7 interlaced 16-bit gray")
    add("rgb_161x97.png", pil_bytes(Image.fromarray(src), "PNG"), "RGB, odd size")

    # BMP
    add("rgb.bmp", pil_bytes(Image.fromarray(noise(12, 16, 3, 9)), "BMP"), "24-bit")
    add("rgba32.bmp", pil_bytes(Image.fromarray(noise(12, 16, 4, 17), "RGBA"), "BMP"),
        "32-bit")
    add("pal8.bmp", pil_bytes(pal.convert("RGB").quantize(16), "BMP"), "8-bit palette")
    add("bw1.bmp", pil_bytes(Image.fromarray(noise(12, 17, 1, 18) > 100), "BMP"), "1-bit")

    # TIFF
    tif_rgb = Image.fromarray(noise(12, 16, 3, 10))
    add("rgb.tif", pil_bytes(tif_rgb, "TIFF"), "uncompressed strips")
    add("rgb_lzw.tif", pil_bytes(Image.fromarray(noise(12, 16, 3, 11)), "TIFF",
                                 compression="tiff_lzw"), "LZW")
    add("rgb_deflate.tif", pil_bytes(tif_rgb, "TIFF", compression="tiff_adobe_deflate"),
        "deflate")
    add("rgb_packbits.tif", pil_bytes(tif_rgb, "TIFF", compression="packbits"), "PackBits")
    big_tif = pil_bytes(Image.fromarray(smooth(40, 50, seed=19)), "TIFF")
    add("rgb_tiles.tif", tiffcp(big_tif, "-t", "-w", "16", "-l", "16"), "16 x 16 tiles")
    add("rgb_tiles_lzw.tif", tiffcp(big_tif, "-t", "-w", "16", "-l", "16", "-c", "lzw"),
        "LZW tiles")
    add("gray16.tif", pil_bytes(Image.fromarray(gray16), "TIFF"), "16-bit gray (clipped)")
    add("rgb16.tif", tiff_rgb16_by_hand(rgb16), "16-bit RGB")
    add("gray8.tif", pil_bytes(Image.fromarray(noise(12, 16, 1, 20), "L"), "TIFF"), "gray")
    return files


def pillow_view(path):
    """What `Image.open(path).convert('RGB')` gives: (w, h, sha256) or an error message."""
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # what Pillow refuses, we must refuse
        return ("error", " ".join(str(e).split()))
    h, w, _ = rgb.shape
    return (w, h, hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = [f"# Pillow {PIL.__version__}, libjpeg-turbo {features.version('libjpeg_turbo')}: "
            "Image.open(file).convert('RGB') of every file here",
            "# file\twidth\theight\tsha256 of the RGB bytes (HWC) | error\tPillow's message"
            "\twhat it covers"]
    total = 0
    for name, data, note in corpus():
        path = os.path.join(args.out, name)
        with open(path, "wb") as f:
            f.write(data)
        total += len(data)
        view = pillow_view(path)
        if view[0] == "error":
            rows.append(f"{name}\terror\t\t{view[1]}\t{note}")
        else:
            rows.append(f"{name}\t{view[0]}\t{view[1]}\t{view[2]}\t{note}")
        print(f"{name:34s} {len(data):7d} B  {rows[-1].split(chr(9), 1)[1][:70]}")
    with open(os.path.join(args.out, "pillow.tsv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(1, 256), cv2.COLORMAP_JET)
    lut[0, :, ::-1].astype(np.uint8).tofile(os.path.join(args.out, "jet_lut_opencv.rgb"))
    print(f"{len(rows) - 2} files, {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
