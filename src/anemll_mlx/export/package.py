"""Turning MIL programs into saved .mlpackage files, reproducibly.

coremltools stamps the conversion date into each model and random UUIDs into each package's
Manifest.json; both are replaced by fixed values so identical inputs give byte-identical packages.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import coremltools as ct
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

DATE_KEY = "com.github.apple.coremltools.conversion_date"
_NAMESPACE = uuid.UUID("6f1d7a52-2b8e-4c61-9a57-0b7c3e2d9f10")


# coremltools' default pipeline runs ~90 passes and validates the whole program after each: most
# of an export's time, for programs that are traced the way those passes would leave them (see
# docs/ARCHITECTURE.md, "Which coremltools passes run").  We run the default pipeline's tail, from
# after remove_redundant_ops on: the passes that prepare a program for the Core ML runtime.
PASSES = (
    "common::dedup_op_and_var_names",
    "common::add_fp16_cast",  # nothing to cast in our fp16 programs; kept as a safety net
    # Gather indices (input_ids, position_ids): 16-bit where the gathered axis fits (the ANE's
    # preference), and for signed indices the select iOS17+ gathers need against negative ones,
    # with the cleanup the default runs after them.  Kept although our indices are never negative:
    # this is what every coremltools conversion (ANEMLL's included) puts before a gather, and how
    # the ANE places a gather without it cannot be checked off-Mac.
    "common::add_int16_cast",
    "common::update_output_dtypes",
    "common::guard_negative_gather_indices",
    "common::const_elimination",
    "common::dead_code_elimination",
    "common::cast_optimization",
    "common::dead_code_elimination",
    "common::add_int16_cast",
    "common::const_elimination",
    "common::dead_code_elimination",
    "common::cast_optimization",
    "common::dead_code_elimination",
    "common::const_elimination",
    # Canonical state updates (no-ops for our programs, which already write this way).
    "common::canonicalize_inplace_pattern",
    "common::prefer_state_in_downstream",
    "common::const_elimination",
    "common::dead_code_elimination",
)


@register_pass(namespace="anemll_mlx", override=True)
class prepare_for_runtime(AbstractGraphPass):  # noqa: N801 (coremltools names passes in snake case)
    """``PASSES`` in order as one pass: coremltools then validates the program once after them,
    not after each (a validation of a SmolLM2 chunk costs ~0.2 s, 20 of them were a quarter of
    an FP16 export)."""

    def apply(self, prog) -> None:
        for name in PASSES:
            PASS_REGISTRY[name](prog)


def pass_pipeline() -> ct.PassPipeline:
    """The pipeline ``convert`` runs: ``PASSES`` (a new object each time: coremltools edits
    pipelines in place).

    Left out on purpose: ``const_deduplication`` (constants are emitted once per function and
    shared across functions by ``weight_id``, ``ops.mil_ops.shared_const``),
    ``remove_redundant_ops`` (repeated ops are built once per function while tracing; the pass
    also merges two reads of a state across a write, see shared/notes/coreml.md),
    ``compose_conv1d`` (it turns our 1x1 convs over (B, C, 1, T) into conv1d over (B, C, T); we
    keep the layout ANEMLL uses), ``reduce_transposes`` (in 1-token functions it turns a few
    transposes of size-1 axes into reshapes: the same values), and the fusions that never match
    our programs.  ``tests/test_export_passes.py`` checks that exports through this list and
    through the default pipeline give bit-identical logits.
    """
    return ct.PassPipeline(pass_names=["anemll_mlx::prepare_for_runtime"], pipeline_name="anemll_mlx")


def convert(program, inputs: list | None = None) -> ct.models.MLModel:
    """A pymil program to an fp16 ML Program for iOS18+/macOS15+, preferring the Neural Engine.

    ``inputs`` gives input types where the program's own are not enough (the embeddings'
    enumerated token counts).  A program of several functions (``export_as_multifunction``, as
    ``programs.chunk_program`` builds them) becomes one multifunction model in this one call.
    Only the passes of ``pass_pipeline()`` run.
    """
    model = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        compute_units=ct.ComputeUnit.CPU_AND_NE,
        inputs=inputs,
        skip_model_load=True,
        pass_pipeline=pass_pipeline(),
    )
    model.user_defined_metadata.pop(DATE_KEY, None)
    return model


def save(model: ct.models.MLModel, path: Path) -> None:
    model.save(str(path))
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
