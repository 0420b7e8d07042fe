"""The gRPC client: one channel with raised message limits, retries from a service config, TLS and
a bearer token; results with numpy label maps and masks."""

import json
from collections import namedtuple

import grpc
import numpy as np

from ._gen import segmentation_pb2 as pb
from ._gen import segmentation_pb2_grpc as pb_grpc
from .geojson import to_geojson
from .images import decode_png16, image_bytes, image_size
from .rle import decode_box_rle, decode_coco_rle

# A nucleus's mask inside its bounding box: mask[y - y0, x - x0] for image pixel (x, y).
Mask = namedtuple("Mask", ["id", "x0", "y0", "mask"])

# Statuses a retry can fix: the service is restarting or a replica is gone (UNAVAILABLE), or it is
# busy (RESOURCE_EXHAUSTED: queue full, admission limits). Bad input is never retried.
RETRYABLE = ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]


class CfrsamError(Exception):
    """A failed call: `code` (grpc.StatusCode) and the service's message in `details`."""

    def __init__(self, code, details):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def service_config(retries, timeout_s):
    """The channel's service config: a deadline per call and, with retries, gRPC's retry policy
    (at most 4 retries: gRPC caps maxAttempts at 5)."""
    method = {"name": [{"service": "cfrsam.v1.Segmentation"}], "timeout": f"{timeout_s:.3f}s"}
    if retries > 0:
        method["retryPolicy"] = {
            "maxAttempts": min(retries, 4) + 1,
            "initialBackoff": "0.5s",
            "maxBackoff": "10s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": RETRYABLE,
        }
    return {"methodConfig": [method]}


class SegmentResult:
    """A SegmentResponse with numpy views: label_map, masks, centroids, GeoJSON."""

    def __init__(self, response, model):
        self.response = response
        self.model = model

    @property
    def nuclei(self):
        """The nuclei (protobuf messages: id, class_name, score, centroid, bbox, polygon, measurements...)."""
        return self.response.nuclei

    @property
    def image_id(self):
        return self.response.image_id

    @property
    def tiles(self):
        """Model tiles the image was cut into."""
        return self.response.tiles

    @property
    def blurred_tiles(self):
        """Of those, the tiles the model's blur gate called blurred at the model's resolution (out of
        focus, or upsampled from a lower magnification); their nuclei were kept at its lower score
        bar. 0 when the model has no gate."""
        return self.response.blurred_tiles

    @property
    def label_map(self):
        """(H, W) uint16: 0 background, i = nucleus with id i; None when not asked for."""
        if not self.response.HasField("label_map"):
            return None
        lm = self.response.label_map
        if lm.HasField("png"):
            return decode_png16(lm.png)
        return np.frombuffer(lm.data, dtype="<u2").reshape(lm.height, lm.width).astype(np.uint16)

    @property
    def masks(self):
        """One Mask(id, x0, y0, bool array) per nucleus, from the RLE masks or else the label map."""
        out = []
        labels = None
        for n in self.response.nuclei:
            b = n.bbox
            if n.HasField("mask"):
                m = n.mask
                if m.encoding == pb.MASK_ENCODING_COCO_RLE:
                    full = decode_coco_rle(m.width, m.height, m.counts)
                    out.append(Mask(n.id, b.x0, b.y0, full[b.y0 : b.y1, b.x0 : b.x1].copy()))
                else:
                    out.append(Mask(n.id, b.x0, b.y0, decode_box_rle(m.width, m.height, m.counts)))
                continue
            if labels is None:
                labels = self.label_map
                if labels is None:
                    raise ValueError("no masks: segment with masks=True or label_map=True")
            out.append(Mask(n.id, b.x0, b.y0, labels[b.y0 : b.y1, b.x0 : b.x1] == n.id))
        return out

    def coco_rles(self):
        """COCO RLE dicts {"size": [h, w], "counts": str} per nucleus (pycocotools.mask.decode reads them)."""
        out = []
        for n in self.response.nuclei:
            if not (n.HasField("mask") and n.mask.encoding == pb.MASK_ENCODING_COCO_RLE):
                raise ValueError("segment with masks=True, mask_encoding='coco' for COCO RLEs")
            out.append({"size": [n.mask.height, n.mask.width], "counts": n.mask.coco_counts})
        return out

    @property
    def centroids(self):
        """(N, 2) float array of x, y in image pixels."""
        return np.array([[n.centroid.x, n.centroid.y] for n in self.response.nuclei], dtype=np.float64).reshape(-1, 2)

    @property
    def class_names(self):
        return [n.class_name for n in self.response.nuclei]

    def to_geojson(self, class_map=None):
        """QuPath FeatureCollection (dict) in slide coordinates (origin + downsample * image pixels)."""
        return to_geojson(self.response, self.model, class_map)

    def save_geojson(self, path, class_map=None):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_geojson(class_map), f, ensure_ascii=False)

    def __repr__(self):
        r = self.response
        return f"SegmentResult({r.width}x{r.height}, {len(r.nuclei)} nuclei, model {r.model_name} {r.model_version})"


def _prompt(p):
    """A prompt from a dict {positive: [(x, y)...], negative: [...], box: (x0, y0, x1, y1)} or an (x, y) point."""
    if isinstance(p, pb.Prompt):
        return p
    if isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p):
        return pb.Prompt(positive=[pb.Point(x=p[0], y=p[1])])
    prompt = pb.Prompt(
        positive=[pb.Point(x=x, y=y) for x, y in p.get("positive", [])],
        negative=[pb.Point(x=x, y=y) for x, y in p.get("negative", [])],
    )
    if p.get("box") is not None:
        x0, y0, x1, y1 = p["box"]
        prompt.box.CopyFrom(pb.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    return prompt


class Client:
    """A client of the Segmentation service.

    address: "host:port" of the gateway. tls: use TLS (implied by `ca`); ca: PEM file of the CA that
    signed the gateway's certificate (system roots otherwise). token: bearer token sent as
    `authorization: Bearer TOKEN`. retries: retries of UNAVAILABLE / RESOURCE_EXHAUSTED (gRPC retry
    policy with exponential backoff; at most 4, 0 for none). timeout: seconds per call. max_message_mb: send and receive
    limit (label maps of large images exceed gRPC's default 4 MiB).
    """

    def __init__(
        self,
        address="localhost:50051",
        *,
        tls=False,
        ca=None,
        token=None,
        retries=4,
        timeout=600.0,
        max_message_mb=512,
        options=(),
    ):
        limit = max_message_mb * 1024 * 1024
        opts = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(service_config(retries, timeout))),
            # A call is retried only while its request fits the retry buffer (256 KiB by default):
            # images are larger.
            ("grpc.per_rpc_retry_buffer_size", limit),
            ("grpc.retry_buffer_size", limit),
            *options,
        ]
        if tls or ca:
            root = None
            if ca:
                with open(ca, "rb") as f:
                    root = f.read()
            self.channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=root), options=opts
            )
        else:
            self.channel = grpc.insecure_channel(address, options=opts)
        self.stub = pb_grpc.SegmentationStub(self.channel)
        self.timeout = timeout
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self._model = None

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request, timeout, metadata=()):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=[*self.metadata, *metadata])
        except grpc.RpcError as err:
            raise CfrsamError(err.code(), err.details()) from None

    def model_info(self):
        """The served model (name, version, classes, mpp...), fetched once."""
        if self._model is None:
            self._model = self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(), 30)
        return self._model

    def segment(
        self,
        image,
        mpp=0.0,
        *,
        prompts=None,
        mode=None,
        min_score=0.0,
        label_map=True,
        label_map_png=False,
        masks=False,
        mask_encoding="box",
        origin=(0.0, 0.0),
        downsample=1.0,
        cell_expansion_um=0.0,
        model="",
        timeout=None,
    ):
        """Segments an image: a path, encoded bytes (PNG, JPEG, TIFF, WebP, GIF) or a numpy array.

        mpp: the image's micrometres per pixel (0: the model's is assumed). prompts: points (x, y)
        or dicts {positive, negative, box} for manual prompts; mode: "auto", "manual" or
        "auto_and_manual". label_map_png: the label map travels as a 16-bit PNG (needs Pillow).
        masks / mask_encoding: RLE masks, "box" (inside the bbox) or "coco" (pycocotools).
        origin / downsample: where the image lies in a slide (level-0 pixels, level-0 pixels per
        image pixel), for GeoJSON in the slide's coordinates. cell_expansion_um: the service grows
        each nucleus by up to this many µm into its cell (QuPath cell objects in to_geojson()).
        """
        data = image_bytes(image)
        request = pb.SegmentRequest(
            image=data,
            model=model,
            prompts=[_prompt(p) for p in (prompts or [])],
            prompt_mode=_mode(mode),
            return_label_map=label_map,
            return_masks=masks,
            min_score=min_score,
            mpp=mpp,
            origin=pb.Point(x=origin[0], y=origin[1]),
            downsample=downsample,
            mask_encoding=_mask_encoding(mask_encoding),
            label_map_encoding=pb.LABEL_MAP_ENCODING_PNG if label_map_png else pb.LABEL_MAP_ENCODING_RAW_UINT16,
            cell_expansion_um=cell_expansion_um,
        )
        model_info = self.model_info()
        # The image's size announced in headers: the gateway prices the request before the upload
        # and, when it cannot answer in time, refuses it at once rather than after receiving it.
        size = image_size(data)
        announce = [("x-image-size", f"{size[0]}x{size[1]}")] if size else []
        if size and mpp > 0:
            announce.append(("x-image-mpp", repr(float(mpp))))
        return SegmentResult(self._call(self.stub.Segment, request, timeout, announce), model_info)

    def refine(
        self,
        image_id,
        prompts,
        *,
        label_map=False,
        masks=False,
        mask_encoding="box",
        cell_expansion_um=0.0,
        timeout=None,
    ):
        """Segments new manual prompts on an image segmented recently (its image_id); only the decoder runs."""
        if isinstance(image_id, SegmentResult):
            image_id = image_id.image_id
        request = pb.RefineRequest(
            image_id=image_id,
            prompts=[_prompt(p) for p in prompts],
            return_label_map=label_map,
            return_masks=masks,
            mask_encoding=_mask_encoding(mask_encoding),
            cell_expansion_um=cell_expansion_um,
        )
        model_info = self.model_info()
        return SegmentResult(self._call(self.stub.Refine, request, timeout), model_info)

    # ------------------------------------------------------------------ slide jobs
    # Whole slides as jobs that the gateways' workers share (a gateway started with --nats-url).

    def upload_slide(self, path, chunk_mb=4, timeout=None, attempts=5, wait_s=3600):
        """Streams a slide file into the gateway's slide root; returns its upload_id.

        As the CLI does: a file the gateway holds already is not sent again, an interrupted upload
        continues where it broke off (up to `attempts` tries), and while another upload of the same
        file runs (ABORTED) it waits, up to `wait_s`, then continues from what that one left.
        """
        import hashlib
        import os
        import time

        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        sha256 = digest.hexdigest()

        def chunks(offset):
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(chunk_mb << 20)
                yield pb.UploadSlideRequest(
                    name=os.path.basename(path), size=size, sha256=sha256, offset=offset, data=data
                )
                while True:
                    data = f.read(chunk_mb << 20)
                    if not data:
                        return
                    yield pb.UploadSlideRequest(data=data)

        wait_until = time.monotonic() + wait_s
        attempt = 1
        while True:
            try:
                held = self._call(self.stub.GetUploadStatus, pb.GetUploadStatusRequest(sha256=sha256, size=size), 30)
                if held.upload_id:
                    return held.upload_id
                return self._call(self.stub.UploadSlide, chunks(held.received), timeout).upload_id
            except CfrsamError as err:
                if err.code == grpc.StatusCode.ABORTED and time.monotonic() < wait_until:
                    time.sleep(1)  # another upload of this file is running: not a failed attempt
                    continue
                if attempt >= attempts or err.code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                time.sleep(0.5 * attempt)
                attempt += 1

    def submit_slide_job(
        self,
        path=None,
        *,
        url=None,
        upload_id=None,
        roi=None,
        mpp=0.0,
        region_size=0,
        overlap=0,
        min_score=0.0,
        request_id="",
        timeout=60,
    ):
        """Queues a slide job: `path` relative to the gateway's slide root, `url`, or `upload_id`.

        roi: (x, y, width, height) in level-0 pixels, or a list of (x, y) polygon points.
        Returns the job id (the same one again for a request_id already submitted).
        """
        given = [v for v in (path, url, upload_id) if v]
        if len(given) != 1:
            raise ValueError("give exactly one of path, url or upload_id")
        ref = (
            pb.SlideReference(path=path)
            if path
            else pb.SlideReference(url=url)
            if url
            else pb.SlideReference(upload_id=upload_id)
        )
        request = pb.SubmitSlideJobRequest(
            slide=ref, mpp=mpp, region_size=region_size, overlap=overlap, min_score=min_score, request_id=request_id
        )
        if roi is not None:
            if len(roi) == 4 and all(isinstance(v, (int, float)) for v in roi):
                request.roi.CopyFrom(pb.SlideRoi(x=roi[0], y=roi[1], width=roi[2], height=roi[3]))
            else:
                request.roi.CopyFrom(pb.SlideRoi(polygon=[pb.Point(x=x, y=y) for x, y in roi]))
        return self._call(self.stub.SubmitSlideJob, request, timeout).job_id

    def slide_job(self, job_id, timeout=30):
        """The job's state and progress (SlideJob: state, tiles_done / tiles_total, nuclei, eta_s...)."""
        return self._call(self.stub.GetSlideJob, pb.GetSlideJobRequest(job_id=job_id), timeout)

    def wait_slide_job(self, job_id, poll_s=2.0, timeout=None, on_progress=None):
        """Polls until the job is DONE, FAILED or CANCELLED and returns it; raises CfrsamError(FAILED_PRECONDITION)
        when it did not finish DONE, TimeoutError after `timeout` seconds."""
        import time

        started = time.monotonic()
        finished = (pb.SLIDE_JOB_STATE_DONE, pb.SLIDE_JOB_STATE_FAILED, pb.SLIDE_JOB_STATE_CANCELLED)
        while True:
            job = self.slide_job(job_id)
            if on_progress:
                on_progress(job)
            if job.state in finished:
                if job.state != pb.SLIDE_JOB_STATE_DONE:
                    state = pb.SlideJobState.Name(job.state)
                    raise CfrsamError(grpc.StatusCode.FAILED_PRECONDITION, f"slide job {job_id} {state}: {job.error}")
                return job
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"slide job {job_id} not done after {timeout} s ({job.tiles_done}/{job.tiles_total} regions)"
                )
            time.sleep(poll_s)

    def slide_job_nuclei(self, job_id, page_size=1000, timeout=None):
        """The nuclei of a DONE job in level-0 pixels, each once, streamed page by page (a generator)."""
        request = pb.StreamSlideJobNucleiRequest(job_id=job_id, page_size=page_size)
        try:
            for page in self.stub.StreamSlideJobNuclei(
                request, timeout=timeout or self.timeout, metadata=self.metadata
            ):
                yield from page.nuclei
        except grpc.RpcError as err:
            raise CfrsamError(err.code(), err.details()) from None

    def download_slide_job_artefact(self, job_id, name, path, timeout=None):
        """Writes an artefact of a DONE job (SlideJob.artefacts: GeoJSON gzip, CSV, summary) to `path`."""
        request = pb.DownloadSlideJobArtefactRequest(job_id=job_id, name=name)
        try:
            with open(path, "wb") as f:
                for chunk in self.stub.DownloadSlideJobArtefact(
                    request, timeout=timeout or self.timeout, metadata=self.metadata
                ):
                    f.write(chunk.data)
        except grpc.RpcError as err:
            raise CfrsamError(err.code(), err.details()) from None
        return path

    def cancel_slide_job(self, job_id, timeout=30):
        return self._call(self.stub.CancelSlideJob, pb.CancelSlideJobRequest(job_id=job_id), timeout)

    def list_slide_jobs(self, page_size=50, timeout=30):
        """All slide jobs, newest first (follows the pages)."""
        jobs, token = [], ""
        while True:
            page = self._call(
                self.stub.ListSlideJobs, pb.ListSlideJobsRequest(page_size=page_size, page_token=token), timeout
            )
            jobs.extend(page.jobs)
            token = page.next_page_token
            if not token:
                return jobs


def _mode(mode):
    if mode is None:
        return pb.PROMPT_MODE_UNSPECIFIED
    try:
        return {
            "auto": pb.PROMPT_MODE_AUTO,
            "manual": pb.PROMPT_MODE_MANUAL,
            "auto_and_manual": pb.PROMPT_MODE_AUTO_AND_MANUAL,
        }[mode]
    except KeyError:
        raise ValueError(f"mode must be auto, manual or auto_and_manual, not {mode!r}") from None


def _mask_encoding(name):
    try:
        return {"box": pb.MASK_ENCODING_BOX_ROW_MAJOR, "coco": pb.MASK_ENCODING_COCO_RLE}[name]
    except KeyError:
        raise ValueError(f"mask_encoding must be 'box' or 'coco', not {name!r}") from None
