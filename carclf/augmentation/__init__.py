"""Offline image augmentation of an HDF5 split, scaled out on Spark (the `augment` step's library).

- ``transforms``: the ops (OpenCV, size-preserving) and their strengths, ``AugmentParams``; keyed randomness.
- ``job``: a validated job (``prepare_job``): input metadata, output path and the ``JobSpec`` sent to the tasks.
- ``range_task``: one Spark task's body: an input row range read, augmented and written into the output.
- ``shards``: the per-range metadata shards the tasks write and the driver checks and merges.
- ``spark_job``: the driver: ranges, the pandas-on-Spark job, the temporary output renamed into place.
- ``progress``: finished/total Spark tasks logged while the job runs.
- ``in_process``: the same augmentation as a plain loop (the benchmark's baseline, the tests' reference).
- ``reports``: what a run logs to MLflow (parameters, counts, a grid of originals and their copies).
"""
