"""Batch scoring of a folder of photos on Spark with ``mlflow.pyfunc.spark_udf``; the Parquet output is written
under a partial name and renamed when complete (``carclf.files.atomic``)."""

from __future__ import annotations

import errno
import os
import pathlib
import re

from carclf.files.atomic import atomic_output, free_bytes, remove_stale_partials, write_error
from carclf.scoring.errors import ScoringError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# spark_udf result: one struct per image. class_id/prob are doubles because spark_udf casts a struct field
# with numpy (a None among ints cannot be cast to int64); they become long/double with nulls afterwards.
SPARK_RESULT_TYPE = (
    "label string, class_id double, prob double, top_k array<struct<label: string, prob: double>>, error string"
)


def score_folder_spark(
    model_uri: str,
    input_dir: os.PathLike | str,
    output: os.PathLike | str,
    top_k: int = 5,
    spark=None,
    spark_master: str = "local[*]",
) -> int:
    """Score every image under ``input_dir`` with ``spark_udf`` on ``spark`` (else the session for
    ``spark_master``: classic or ``sc://`` Spark Connect); writes Parquet (path, label, class_id, prob, top_k,
    error) to ``output`` (written under a temporary name, renamed when complete). Returns the row count."""
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    # Absolute: Spark resolves a relative path where its executors run (a Connect server's own folder).
    input_dir = pathlib.Path(input_dir).absolute()
    output = pathlib.Path(output).absolute()
    if not input_dir.is_dir():
        raise ScoringError(f"--input-dir {input_dir} is not a folder")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in input_dir.rglob("*") if p.is_file()):
        raise ScoringError(f"--input-dir {input_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if spark is None:
        from carclf.compute.spark_session import get_spark

        spark = get_spark(spark_master, app_name="carclf-score")
    files = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(str(input_dir))
        .where(F.lower(F.col("path")).rlike("(" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES) + ")$"))
    )
    predict = mlflow.pyfunc.spark_udf(
        spark,
        model_uri,
        result_type=SPARK_RESULT_TYPE,
        env_manager="local",
        # top_k as a nested list, the Parquet's array column (a model saved without that param answers so anyway).
        params={"top_k": int(top_k), "errors": "coerce", "top_k_format": "list"},
    )
    scored = files.select("path", predict(F.col("content")).alias("p"))
    # A bad image comes back with an empty top_k (a good one has at least one entry). spark_udf's struct
    # conversion turns its null label/error into the text "None" and its null class_id/prob into NaN, so
    # the fields are rebuilt from that flag instead of being trusted as they are.
    bad = F.size(F.col("p.top_k")) == 0
    result = scored.select(
        "path",
        F.when(bad, F.lit(None)).otherwise(F.col("p.label")).alias("label"),
        F.when(bad, F.lit(None)).otherwise(F.col("p.class_id").cast("long")).alias("class_id"),
        F.when(bad, F.lit(None)).otherwise(F.col("p.prob")).alias("prob"),
        F.when(bad, F.lit(None)).otherwise(F.col("p.top_k")).alias("top_k"),
        F.when(bad, F.col("p.error")).otherwise(F.lit(None)).alias("error"),
    )
    # A killed earlier run's folder goes first; this run's is named after its pid, so the next run can tell.
    remove_stale_partials(output.parent)
    free_at_start = free_bytes(output.parent)
    with atomic_output(output) as partial:
        try:
            result.write.mode("error").parquet(str(partial))
        except Exception as exc:  # Py4J's Java error: many lines, the errno only in its text
            if "No space left on device" not in str(exc):
                raise
            raise write_error(output, OSError(errno.ENOSPC, "no space"), free_at_start=free_at_start) from None
        count = spark.read.parquet(str(partial)).count()
        if output.is_file() or output.is_symlink():  # a folder cannot be renamed over a file
            output.unlink()
    return count
