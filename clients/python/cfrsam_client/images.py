"""Images to bytes for the service: paths, bytes and numpy arrays (encoded as PNG with zlib alone)."""

import os
import struct
import zlib

import numpy as np


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(array):
    """PNG bytes of an (H, W), (H, W, 3) or (H, W, 4) uint8 or uint16 array (no filtering; zlib level 6)."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {np.asarray(array).shape}")
    if a.dtype == np.uint8:
        depth = 8
    elif a.dtype == np.uint16:
        depth = 16
        a = a.astype(">u2")
    elif a.dtype == np.bool_:
        depth, a = 8, a.astype(np.uint8) * 255
    else:
        raise ValueError(f"expected uint8 or uint16 pixels, got {a.dtype} (scale floats to 0..255 and cast to uint8)")
    h, w, c = a.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = a.reshape(h, -1).view(np.uint8).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def image_bytes(image):
    """Bytes to send: a path (str or os.PathLike), encoded bytes, or a numpy array (sent as PNG)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        return encode_png(np.asarray(image))
    raise TypeError(f"image must be a path, bytes or a numpy array, not {type(image).__name__}")


def image_size(data):
    """(width, height) of encoded PNG or JPEG bytes, read from the header; None for other formats.

    Sent as the x-image-size header, so the gateway prices a request before its body arrives.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            length = struct.unpack(">H", data[i + 2 : i + 4])[0]
            # Start-of-frame markers (not DHT C4, JPG C8, DAC CC) carry height then width.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                return (width, height)
            i += 2 + length
    return None


def decode_png16(data):
    """A 16-bit greyscale PNG (the service's label map) as an (H, W) uint16 array; needs Pillow."""
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "decoding a PNG label map needs Pillow (pip install Pillow / apt install python3-pil)"
        ) from err
    import io

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).astype(np.uint16)
