"""Pack the training data into one compressed tar that fits what travels to a GPU machine (64 MiB).

    python -m cfrsam.data.pack [--data ../shared/data] --out ../.gpu/data.tar [--quality 95]

Images are re-encoded as JPEG (the CoNSeP tiles are JPEG-sourced already; q95 changes pixel values
by a few levels, below the training augmentation's colour jitter); label maps and JSON are copied
unchanged (lossless). The dataset reads NAME.jpg when NAME.png is absent, so `--data` can point at
the unpacked folder directly.
"""

import argparse
import io
import sys
import tarfile
from pathlib import Path

from PIL import Image

from .dataset import default_data_root, list_samples

DEFAULT_SETS = ("consep-train", "monuseg-train", "cpm15", "nucls/train", "dsb2018-stained")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack(data: Path, out: Path, sets, quality: int) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(out, "w") as tar:
        for set_name in sets:
            root = data / set_name
            if not root.is_dir():
                print(f"pack: {root} absent, skipped", file=sys.stderr)
                continue
            for name in list_samples(root):
                buf = io.BytesIO()
                with Image.open(root / f"{name}.png") as im:
                    im.convert("RGB").save(buf, "JPEG", quality=quality, subsampling=0)
                _add_bytes(tar, f"{set_name}/{name}.jpg", buf.getvalue())
                for suffix in (".labels.png", ".json"):
                    tar.add(root / f"{name}{suffix}", arcname=f"{set_name}/{name}{suffix}")
                count += 1
            if (root / "INDEX.json").is_file():
                tar.add(root / "INDEX.json", arcname=f"{set_name}/INDEX.json")
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(default_data_root()))
    parser.add_argument("--out", default="../.gpu/data.tar")
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS))
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args(argv)
    n = pack(Path(args.data), Path(args.out), [s for s in args.sets.split(",") if s], args.quality)
    print(f"packed {n} samples into {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
