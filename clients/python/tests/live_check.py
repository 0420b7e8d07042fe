"""Checks the installed client against a running gateway; run by test/python-client.test.ts (CI).

    python live_check.py HOST:PORT IMAGE [TLS_HOST:PORT CA_FILE TOKEN]

The optional second gateway serves TLS (certificate signed by CA_FILE) and accepts TOKEN only.

Exits non-zero on the first failed check and prints a JSON summary on success.
"""

import hashlib
import json
import os
import sys
import time

import grpc
import numpy as np

from cfrsam_client import CfrsamError, Client, coco_rle_from_mask, decode_coco_rle
from cfrsam_client._gen import segmentation_pb2 as pb


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")


def main(address, image_path):
    # The README's three lines.
    client = Client(address)
    result = client.segment(image_path, mpp=0.25)
    labels = result.label_map

    n = len(result.nuclei)
    check(n > 0, "nuclei found")
    check(isinstance(labels, np.ndarray) and labels.dtype == np.uint16, "label map is a numpy uint16 array")
    check(labels.shape == (result.response.height, result.response.width), "label map shape is (H, W)")
    check(set(np.unique(labels).tolist()) == set(range(n + 1)), "label map holds 0..N")
    masks = result.masks
    check(len(masks) == n and all(m.mask.any() for m in masks), "a non-empty mask per nucleus (from the label map)")
    first = masks[0]
    check(
        np.array_equal(
            first.mask,
            labels[first.y0 : first.y0 + first.mask.shape[0], first.x0 : first.x0 + first.mask.shape[1]] == first.id,
        ),
        "mask = label map crop",
    )

    # A numpy array in, the same nuclei out.
    try:
        from PIL import Image

        pixels = np.asarray(Image.open(image_path).convert("RGB"))
        again = client.segment(pixels, mpp=0.25, label_map=False)
        check(len(again.nuclei) == n, f"ndarray input finds the same {n} nuclei (got {len(again.nuclei)})")
    except ImportError:
        pass

    # COCO RLE masks (pycocotools layout) and the label map as PNG bytes.
    coco = client.segment(image_path, mpp=0.25, masks=True, mask_encoding="coco", label_map_png=True)
    check(coco.response.label_map.HasField("png") and len(coco.response.label_map.data) == 0, "label map sent as PNG")
    check(np.array_equal(coco.label_map, labels), "PNG label map equals the raw one")
    rles = coco.coco_rles()
    for nucleus, rle in zip(coco.nuclei, rles):
        full = decode_coco_rle(nucleus.mask.width, nucleus.mask.height, nucleus.mask.counts)
        check(
            np.array_equal(full, labels == nucleus.id), f"COCO mask of nucleus {nucleus.id} equals its label-map region"
        )
        check(coco_rle_from_mask(full) == rle, f"COCO counts string of nucleus {nucleus.id} as pycocotools encodes it")
    check(rles[0]["size"] == [coco.response.height, coco.response.width], "COCO size is [h, w]")
    box = client.segment(image_path, mpp=0.25, masks=True, label_map=False)
    check(
        all(np.array_equal(a.mask, b.mask) for a, b in zip(box.masks, masks)), "box RLE masks equal the label-map masks"
    )

    # Refine on the image_id: one nucleus per prompt.
    c = result.nuclei[0].centroid
    refined = client.refine(result, [(c.x, c.y)])
    check(len(refined.nuclei) == 1, "refine: one nucleus for one point")

    # GeoJSON in slide coordinates with QuPath's names.
    placed = client.segment(image_path, mpp=0.25, origin=(10000, 20000), downsample=2)
    geo = placed.to_geojson()
    check(len(geo["features"]) == n, "one Feature per nucleus")
    f0 = geo["features"][0]
    ring = f0["geometry"]["coordinates"][0]
    p0 = placed.nuclei[0].polygon[0]
    check(ring[0] == [10000 + 2 * p0.x, 20000 + 2 * p0.y], "slide = origin + downsample * image")
    check(ring[0] == ring[-1], "rings closed")
    image_props = geo["properties"]["image"]
    check(image_props["tiles"] == placed.tiles >= 1, "the focus check: model tiles run")
    check(0 <= image_props["blurredTiles"] == placed.blurred_tiles <= placed.tiles, "tiles blurred")
    c0 = placed.nuclei[0].centroid
    check(f0["properties"]["measurements"]["Centroid X px"] == 10000 + 2 * c0.x, "centroid in slide coordinates")
    m = f0["properties"]["measurements"]
    for name in (
        "Nucleus ID",
        "Area µm^2",
        "Length µm",
        "Max diameter µm",
        "Min diameter µm",
        "Circularity",
        "Solidity",
    ):
        check(name in m, f"measurement {name!r}")
    check(m["Max diameter µm"] >= m["Min diameter µm"] > 0, "max diameter >= min diameter > 0")
    check(geo["properties"]["model"]["name"] == result.response.model_name, "model at collection level")
    names = {f["properties"].get("classification", {}).get("name") for f in geo["features"]} - {None}
    check(names <= {"Other", "Immune cells", "Epithelial", "Stroma"}, f"QuPath class names, got {names}")
    mapped = placed.to_geojson(class_map={"epithelial": "Tumor"})
    check(
        all(
            f["properties"]["classification"]["name"] != "Epithelial"
            for f in mapped["features"]
            if "classification" in f["properties"]
        ),
        "class mapping applies",
    )

    # Cells grown by the service: QuPath cell objects around the same nuclei.
    grown = client.segment(image_path, mpp=0.25, origin=(10000, 20000), downsample=2, cell_expansion_um=3)
    cell_geo = grown.to_geojson()
    check(len(cell_geo["features"]) == n, "one cell per nucleus")
    check(all(f["properties"]["objectType"] == "cell" for f in cell_geo["features"]), "cell objects")
    g0 = cell_geo["features"][0]
    check(g0["properties"]["nucleusGeometry"] == f0["geometry"], "the nucleus outline is the cell's nucleusGeometry")
    cm = g0["properties"]["measurements"]
    check(cm["Cell: Area µm^2"] > cm["Nucleus: Area µm^2"] > 0, "the cell is larger than its nucleus")
    check(cm["Nucleus: Hematoxylin OD mean"] > 0, "H&E optical densities")

    # Bad input: a clear status, not a crash.
    try:
        client.segment(image_path, cell_expansion_um=500)
        check(False, "a 500 µm cell expansion refused")
    except CfrsamError as err:
        check(
            err.code.name == "INVALID_ARGUMENT" and "cell_expansion_um" in err.details, f"cell expansion error: {err}"
        )
    try:
        client.segment(b"not an image")
        check(False, "bad image refused")
    except CfrsamError as err:
        check(
            err.code.name == "INVALID_ARGUMENT" and "not recognised" in err.details,
            f"INVALID_ARGUMENT naming the problem, got {err}",
        )

    # A token travels as `authorization` metadata (servers without auth ignore it).
    with Client(address, token="secret-token") as authed:
        check(len(authed.segment(image_path, mpp=0.25, label_map=False).nuclei) == n, "token client segments")

    print(
        json.dumps(
            {"nuclei": n, "shape": list(labels.shape), "classes": sorted(names), "model": result.response.model_version}
        )
    )


def check_tls(address, ca, token, image_path):
    """TLS with the CA given, and the bearer token: refused without it, served with it."""
    with Client(address, ca=ca, retries=0) as anonymous:
        try:
            anonymous.model_info()
            check(False, "a call without the token is refused")
        except CfrsamError as err:
            check(err.code.name == "UNAUTHENTICATED", f"UNAUTHENTICATED without the token, got {err}")
    with Client(address, ca=ca, token=token) as client:
        result = client.segment(image_path, mpp=0.25, label_map_png=True)
        check(len(result.nuclei) > 0 and result.label_map.dtype == np.uint16, "segments over TLS with the token")
        return len(result.nuclei)


def check_slide_job(address, image_path):
    """Slide-job helpers (a gateway with --nats-url): upload, submit, wait, stream the nuclei."""
    with Client(address) as client:
        # An upload that broke off after its first 1000 bytes; upload_slide continues it.
        with open(image_path, "rb") as f:
            data = f.read()
        sha256 = hashlib.sha256(data).hexdigest()

        def broken():
            yield pb.UploadSlideRequest(name="check.png", size=len(data), sha256=sha256, data=data[:1000])
            time.sleep(0.5)  # the gateway writes what arrived before the stream breaks
            raise RuntimeError("connection lost")

        try:
            client.stub.UploadSlide(broken(), timeout=30)
        except grpc.RpcError:
            pass
        held = client.stub.GetUploadStatus(pb.GetUploadStatusRequest(sha256=sha256, size=len(data)))
        check(held.received == 1000 and not held.upload_id, f"an interrupted upload is held ({held.received} bytes)")
        upload_id = client.upload_slide(image_path)
        check(upload_id.startswith(sha256), "the retry continues it to the whole file")
        check(client.upload_slide(image_path) == upload_id, "a file the gateway holds is not sent again")
        job_id = client.submit_slide_job(upload_id=upload_id, mpp=0.25, region_size=256, request_id="py-check")
        check(
            client.submit_slide_job(upload_id=upload_id, mpp=0.25, region_size=256, request_id="py-check") == job_id,
            "same request id, same job",
        )
        seen = []
        job = client.wait_slide_job(job_id, poll_s=1, timeout=300, on_progress=lambda j: seen.append(j.tiles_done))
        check(job.tiles_done == job.tiles_total > 0, "every region done")
        nuclei = list(client.slide_job_nuclei(job_id, page_size=50))
        check(len(nuclei) == job.nuclei > 0, f"streamed nuclei = the job's count ({len(nuclei)} vs {job.nuclei})")
        check(len({n.id for n in nuclei}) == len(nuclei), "each nucleus once")
        check(any(j.job_id == job_id for j in client.list_slide_jobs()), "the job is listed")
        return len(nuclei)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    if os.environ.get("CFRSAM_SLIDE_JOBS"):
        print(json.dumps({"slide_job_nuclei": check_slide_job(sys.argv[1], sys.argv[2])}))
    if len(sys.argv) > 5:
        print(json.dumps({"tls_nuclei": check_tls(sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[2])}))
