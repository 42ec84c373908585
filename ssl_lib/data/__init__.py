"""Data: raw sources (``sources``, a folder's files listed and hashed by ``files``, decoded by ``decode``), split
assignment (``splits``), writing the prepared dataset (``ingest``, its images.npy in blocks by ``image_file``) and
reading it (``prepared``). Import from the submodule that does the job: a stage that only reads prepared data then
loads none of the ingest code, and dvc.yaml can list exactly what each stage runs.

Plain Python (numpy, pandas, pillow, scikit-learn); no orchestration imports.
"""
