"""Turning MIL programs into saved .mlpackage files, reproducibly.

coremltools stamps the conversion date into each model and random UUIDs into each package's
Manifest.json; both are replaced by fixed values so identical inputs give byte-identical packages.
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings
from pathlib import Path

import coremltools as ct

DATE_KEY = "com.github.apple.coremltools.conversion_date"
_NAMESPACE = uuid.UUID("6f1d7a52-2b8e-4c61-9a57-0b7c3e2d9f10")


# ML Program names allow only [A-Za-z0-9_]: the state ANEMLL calls model.model.kv_cache_0 is stored as
# model_model_kv_cache_0, as in ANEMLL's own conversions; the warning about it is expected.
warnings.filterwarnings("ignore", message=r"Input, 'model\.model\.kv_cache_0'")


def convert(program, inputs: list | None = None) -> ct.models.MLModel:
    """A pymil program to an fp16 ML Program for iOS18+/macOS15+, preferring the Neural Engine.

    ``inputs`` gives input types where the program's own are not enough (the embeddings'
    enumerated token counts).
    """
    model = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        compute_units=ct.ComputeUnit.CPU_AND_NE,
        inputs=inputs,
        skip_model_load=True,
    )
    model.user_defined_metadata.pop(DATE_KEY, None)
    return model


def save(model: ct.models.MLModel, path: Path) -> None:
    model.save(str(path))
    make_reproducible(path)


def save_functions(models: dict[str, ct.models.MLModel], path: Path, scratch: Path, default: str) -> None:
    """Several single-function models as one multifunction package (weights shared when identical)."""
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, model in models.items():
        part = scratch / f"{path.stem}.{name}.mlpackage"
        model.save(str(part))
        descriptor.add_function(str(part), src_function_name="main", target_function_name=name)
    descriptor.default_function_name = default
    ct.utils.save_multifunction(descriptor, str(path))
    for name in models:
        shutil.rmtree(scratch / f"{path.stem}.{name}.mlpackage")
    make_reproducible(path)


def make_reproducible(path: Path) -> None:
    """Serialise the spec deterministically (protobuf maps otherwise come out in hash order) and
    replace the manifest's random item identifiers with ones derived from the item paths."""
    spec_path = path / "Data/com.apple.CoreML/model.mlmodel"
    spec = ct.utils.load_spec(str(path))
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    manifest_path = path / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed = {}
    mapping = {}
    for old, item in manifest["itemInfoEntries"].items():
        new = str(uuid.uuid5(_NAMESPACE, item["path"])).upper()
        mapping[old] = new
        renamed[new] = item
    manifest["itemInfoEntries"] = dict(sorted(renamed.items()))
    manifest["rootModelIdentifier"] = mapping[manifest["rootModelIdentifier"]]
    # The layout coremltools itself writes (it rewrites the manifest when it opens a package).
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
