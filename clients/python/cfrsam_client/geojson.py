"""QuPath GeoJSON of a segmentation result, in the slide's coordinates and with QuPath's names.

The same layout as the service's TypeScript writer (packages/nuclei/src/formats/geojson.ts): one
`detection` Feature per nucleus, `classification` {name, color} from a QuPath class mapping, and
`measurements` named as QuPath names its own ("Area µm^2", "Length µm", "Max diameter µm", ...).
Coordinates: slide = origin + downsample * image pixels (the request's origin and downsample).
"""

import hashlib
import math

# QuPath's built-in classes and their colours (PathClass defaults).
QUPATH_CLASSES = {
    "Tumor": [200, 0, 0],
    "Stroma": [150, 200, 150],
    "Immune cells": [160, 90, 160],
    "Necrosis": [50, 50, 50],
    "Other": [255, 200, 0],
    "Region*": [0, 0, 180],
    "Ignore*": [180, 180, 180],
    "Positive": [200, 50, 50],
    "Negative": [112, 112, 225],
}

# The model's class names -> QuPath class names (the CoNSeP classes of the default model).
DEFAULT_CLASS_MAP = {
    "other": "Other",
    "inflammatory": "Immune cells",
    "epithelial": "Epithelial",
    "spindle-shaped": "Stroma",
}


def _hex_rgb(color, fallback=(255, 255, 0)):
    c = (color or "").lstrip("#")
    if len(c) != 6:
        return list(fallback)
    return [int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)]


def qupath_class(name, model_color, class_map=None):
    """(QuPath name, [r, g, b]) of a model class: mapped name; QuPath's colour for its own classes."""
    mapping = {**DEFAULT_CLASS_MAP, **(class_map or {})}
    target = mapping.get(name, name[:1].upper() + name[1:])
    if isinstance(target, (tuple, list)):
        return target[0], list(target[1])
    return target, QUPATH_CLASSES.get(target, _hex_rgb(model_color))


def feature_id(image_id, nucleus_id):
    """A stable UUID-shaped id from the image and nucleus ids (as the TypeScript writer makes it)."""
    h = hashlib.sha1(f"{image_id}/{nucleus_id}".encode()).hexdigest()
    return f"{h[0:8]}-{h[8:12]}-5{h[13:16]}-{(int(h[16], 16) & 3) | 8:x}{h[17:20]}-{h[20:32]}"


def _hull(points):
    pts = sorted(set(points))
    if len(pts) < 3:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def caliper_diameters(points):
    """(max, min) caliper (Feret) diameters of a polygon, in its units: QuPath's Max/Min diameter."""
    hull = _hull([(float(x), float(y)) for x, y in points])
    if len(hull) < 2:
        return 0.0, 0.0
    dmax = max(math.dist(a, b) for i, a in enumerate(hull) for b in hull[i + 1 :])
    if len(hull) < 3:
        return dmax, 0.0
    dmin = math.inf
    for i, a in enumerate(hull):
        b = hull[(i + 1) % len(hull)]
        length = math.dist(a, b)
        if length == 0:
            continue
        width = max(abs((b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])) / length for p in hull)
        dmin = min(dmin, width)
    return dmax, dmin


def measurements(nucleus, mpp, class_names):
    """QuPath-named measurements of one nucleus (µm from the image's mpp)."""
    m = nucleus.measurements
    dmax, dmin = caliper_diameters([(p.x, p.y) for p in nucleus.polygon])
    out = {
        "Nucleus ID": nucleus.id,
        "Score": nucleus.score,
        "Predicted IoU": nucleus.predicted_iou,
        "Area µm^2": m.area_um2 if m.area_um2 > 0 else m.area_px * mpp * mpp,
        "Length µm": m.perimeter_px * mpp,
        "Circularity": m.circularity,
        "Solidity": m.solidity,
        "Eccentricity": m.eccentricity,
        "Max diameter µm": dmax * mpp,
        "Min diameter µm": dmin * mpp,
        "Red: Mean": m.mean_r,
        "Green: Mean": m.mean_g,
        "Blue: Mean": m.mean_b,
    }
    for i, p in enumerate(nucleus.class_probabilities):
        out[f"Probability: {class_names[i] if i < len(class_names) else f'class {i}'}"] = p
    return out


def _polygon(points, ox, oy, ds):
    """A GeoJSON Polygon of a closed outline, in slide coordinates (origin + downsample * pixels)."""
    ring = [[ox + ds * p.x, oy + ds * p.y] for p in points]
    ring.append(list(ring[0]))
    return {"type": "Polygon", "coordinates": [ring]}


def cell_measurements(nucleus_measurements, cell, scale):
    """A cell object's measurements: the nucleus's under "Nucleus: ", the cell's, H&E optical densities."""
    shared = ("Nucleus ID", "Score", "Predicted IoU", "Probability: ")
    out = {}
    for k, v in nucleus_measurements.items():
        out[k if k.startswith(shared) else f"Nucleus: {k}"] = v
    nucleus_area = nucleus_measurements.get("Area µm^2", nucleus_measurements.get("Area px^2", 0.0))
    cell_area = cell.area_px * scale * scale if scale > 0 else cell.area_px
    out["Cell: Area µm^2" if scale > 0 else "Cell: Area px^2"] = cell_area
    out["Cell: Length µm" if scale > 0 else "Cell: Length px"] = (
        cell.perimeter_px * scale if scale > 0 else cell.perimeter_px
    )
    out["Nucleus: Hematoxylin OD mean"] = cell.nucleus_hematoxylin_od
    out["Nucleus: Eosin OD mean"] = cell.nucleus_eosin_od
    out["Cell: Hematoxylin OD mean"] = cell.cell_hematoxylin_od
    out["Cell: Eosin OD mean"] = cell.cell_eosin_od
    out["Nucleus/Cell area ratio"] = nucleus_area / cell_area if cell_area > 0 else 0.0
    return out


def to_geojson(response, model, class_map=None):
    """A QuPath FeatureCollection (dict) of a SegmentResponse, given the ModelInfo that served it."""
    origin = response.origin if response.HasField("origin") else None
    ox, oy = (origin.x, origin.y) if origin else (0.0, 0.0)
    ds = response.downsample if response.HasField("downsample") and response.downsample > 0 else 1.0
    mpp = response.image_mpp or model.mpp
    styles = {c.index: qupath_class(c.name, c.color, class_map) for c in model.classes}
    names = [styles[c.index][0] for c in sorted(model.classes, key=lambda c: c.index)]
    features = []
    for n in response.nuclei:
        if len(n.polygon) < 3:
            continue
        m = measurements(n, mpp, names)
        # The mask's centroid in the output's coordinates (QuPath computes its own from the outline).
        m["Centroid X px"] = ox + ds * n.centroid.x
        m["Centroid Y px"] = oy + ds * n.centroid.y
        geometry = _polygon(n.polygon, ox, oy, ds)
        props = {"objectType": "detection", "isLocked": False, "measurements": m}
        # A nucleus the service grew into its cell (segment(..., cell_expansion_um=...)): a QuPath cell.
        if n.HasField("cell") and len(n.cell.polygon) >= 3:
            props = {
                "objectType": "cell",
                "nucleusGeometry": geometry,
                "isLocked": False,
                "measurements": cell_measurements(m, n.cell, mpp),
            }
            geometry = _polygon(n.cell.polygon, ox, oy, ds)
        if n.class_index in styles:
            name, color = styles[n.class_index]
            props["classification"] = {"name": name, "color": color}
        features.append(
            {
                "type": "Feature",
                "id": feature_id(response.image_id, n.id),
                "geometry": geometry,
                "properties": props,
            }
        )
    return {
        "type": "FeatureCollection",
        "properties": {
            "model": {"name": response.model_name, "version": response.model_version, "mpp": response.model_mpp},
            "image": {
                "id": response.image_id,
                "width": response.width,
                "height": response.height,
                "mpp": response.image_mpp,
                "mppAssumed": response.mpp_assumed,
                "origin": [ox, oy],
                "downsample": ds,
                # Model tiles run, and those the model's blur gate called blurred at the model's resolution.
                "tiles": response.tiles,
                "blurredTiles": response.blurred_tiles,
            },
        },
        "features": features,
    }
