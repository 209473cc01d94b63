"""One augmentation job, validated before any work starts: its input, output and the spec its tasks receive.

``prepare_job`` checks every parameter and opens the input (a missing or malformed file is one DatasetError
line), so a bad call fails in a second, before a Spark session starts. ``JobSpec`` is what travels to each
task: small, picklable, and the same for every attempt of a task.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import h5py

from carclf.augmentation.errors import AugmentError
from carclf.augmentation.transforms import AugmentParams
from carclf.data.hdf5_dataset import DatasetInfo, estimated_split_bytes, read_dataset_info
from carclf.files.atomic import check_room_for


@dataclasses.dataclass(frozen=True)
class JobSpec:
    input: str
    copies: int
    keep_original: bool
    params: AugmentParams
    seed: int
    shard_dir: str = ""
    fail_mode: str = ""  # the failure-injection hook's value at submit time (tests only, see range_task)
    output_tmp: str = ""  # the output's temporary file, whose preallocated image block the tasks write into
    images_offset: int = 0  # byte offset of output row 0 in that file
    row_bytes: int = 0

    @property
    def rows_per_source(self) -> int:
        return self.copies + (1 if self.keep_original else 0)


@dataclasses.dataclass(frozen=True)
class AugmentJob:
    """A validated job: the resolved paths, the input's metadata and the tasks' spec."""

    spec: JobSpec
    input_path: pathlib.Path
    output_path: pathlib.Path
    info: DatasetInfo
    split: str  # the input's split attribute, kept on the output
    partitions: int  # Spark tasks asked for; 0 = automatic

    def output_attrs(self, engine: str) -> dict:
        """The attributes that say how the output was made (beside the input's preprocessing attributes)."""
        spec = self.spec
        return {
            "augment_source": str(self.input_path),
            "augment_copies": spec.copies,
            "augment_keep_original": spec.keep_original,
            "augment_seed": spec.seed,
            "augment_params": json.dumps(spec.params.to_dict(), sort_keys=True),
            "augment_layout": "per source row: original (source_index -1) if kept, then copies 1..augment_copies",
            "augment_engine": engine,
        }


def prepare_job(
    input, output, *, copies: int, keep_original: bool, params: AugmentParams, seed: int, partitions: int = 0
) -> AugmentJob:
    """Validate the parameters, read the input's metadata and check the output's disk has room for it;
    AugmentError, DatasetError or OutputWriteError name the problem."""
    copies, seed, partitions = int(copies), int(seed), int(partitions)
    input_path, output_path = _validate(input, output, copies, keep_original, seed, partitions)
    info, split = read_input_meta(str(input_path))
    spec = JobSpec(input=str(input_path), copies=copies, keep_original=bool(keep_original), params=params, seed=seed)
    rows = info.num_images * spec.rows_per_source
    # File names of the copies are the source's with a suffix: the input's own average is a fair bound.
    needed = estimated_split_bytes(rows, info.image_size, name_bytes=rows * 128, num_classes=info.num_classes)
    check_room_for(output_path.parent, needed, output_path.name)
    return AugmentJob(spec, input_path, output_path, info, split, partitions)


def read_input_meta(path: str) -> tuple[DatasetInfo, str]:
    """class names, settings and split attribute of the input (validated)."""
    info = read_dataset_info(path)
    with h5py.File(path, "r") as f:
        split = f.attrs.get("split", "")
    split = split.decode() if isinstance(split, bytes) else str(split)
    return info, split


def _validate(input, output, copies, keep_original, seed, partitions) -> tuple[pathlib.Path, pathlib.Path]:
    if copies < 0:
        raise AugmentError(f"copies must be >= 0, got {copies}")
    if copies == 0 and not keep_original:
        raise AugmentError("copies=0 with keep_original=false would write an empty file")
    if seed < 0:
        raise AugmentError(f"seed must be >= 0, got {seed}")
    if partitions < 0:
        raise AugmentError(f"partitions must be >= 0 (0 = automatic), got {partitions}")
    if not str(input):
        raise AugmentError("input is empty; give the HDF5 split to augment")
    if not str(output):
        raise AugmentError("output is empty; give the HDF5 file to write")
    input_path, output_path = pathlib.Path(input).resolve(), pathlib.Path(output).resolve()
    if input_path == output_path:
        raise AugmentError(f"output {output_path} is the input file; choose another name")
    if output_path.is_dir():
        raise AugmentError(f"output {output_path} is a folder; give a file name such as train_aug.h5")
    return input_path, output_path
