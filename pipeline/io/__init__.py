"""Input and storage I/O: where bytes come from and go to (:mod:`.storage`: local paths and ``s3://`` through fsspec,
access errors as one line), which images a job reads (:mod:`.sources`: the manifest of a COCO root, folder, tar or
parquet input) and how bytes become pixels (:mod:`.decode`)."""
